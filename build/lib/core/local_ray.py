"""A private Ray that this project starts listens on loopback only.

Ray 2.55 takes a node's IP from the machine's outward-facing address, even when given 127.0.0.1, and its GCS,
raylet, workers and agents then listen on that address or on every interface, without authentication.
Ray's own single-machine switch (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, on by default on Windows and macOS)
makes loopback the node IP, and then every Ray server binds 127.0.0.1. One server ignores it: each Serve
replica's inter-deployment gRPC server is hard-coded to `[::]:0` (ray-project/ray#64544), which
`loopback_grpc_servers` redirects inside the replica. A cluster the user names (`RAY_ADDRESS`,
`ray job submit`) is theirs and is left as it is.
"""
from __future__ import annotations

import os

import ray
from grpc.aio._server import Server as AioGrpcServer
from ray._private import ray_constants

# For processes that start their own Ray (a Flower simulation, `serve run`): put this in their environment.
LOOPBACK_ENV = {ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR: "0"}


def init_local_ray(**kwargs) -> None:
    """`ray.init(address="local", **kwargs)` with every Ray process on 127.0.0.1."""
    os.environ.update(LOOPBACK_ENV)  # Ray's child processes and their children
    ray_constants.ENABLE_RAY_CLUSTER = False  # read when `ray` was imported; the node IP lookup reads it here
    ray.init(address="local", **kwargs)


def loopback_grpc_servers() -> None:
    """In a process of a loopback Ray (the switch above is in its environment): an asyncio gRPC server asked to
    listen on every interface ("[::]:port") listens on 127.0.0.1 instead. Call it from a Serve replica's
    constructor, before Serve starts the replica's inter-deployment server."""
    if os.environ.get(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR) != "0" or getattr(AioGrpcServer, "_posettp", 0):
        return
    wildcard = AioGrpcServer.add_insecure_port

    def add_insecure_port(self, address: str) -> int:
        return wildcard(self, "127.0.0.1:" + address[len("[::]:"):] if address.startswith("[::]:") else address)

    AioGrpcServer.add_insecure_port = add_insecure_port
    AioGrpcServer._posettp = 1
