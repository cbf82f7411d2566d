"""Helpers for the Ray Train tests: a tiny synth dataset, a private Ray head on loopback (or a head and a
second node), joint.py runs, and stopping exactly the processes a test started.

Every process a test starts carries POSETTP_RAYTEST=<tag> in its environment (Ray's daemons and
workers inherit it), so teardown finds and stops those PIDs and their descendants and nothing else:
never `ray stop`.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from core.local_ray import LOOPBACK_ENV
from posettp.procs import pids_with_env, stop_pids

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
TAG_KEY = "POSETTP_RAYTEST"
TINY = ["train.max_steps=6", "train.report_every=3", "train.batch_size=4", "model.image_size=64",
        "train.val_frames=16"]


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (sockets held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def make_synth(out: str, persons: int = 5, frames: int = 6, size: int = 64, seed: int = 0) -> str:
    """A tiny dataset through the documented `posettp synth` command (train/val/test persons)."""
    cmd = [str(VENV_BIN / "posettp"), "synth", "--out", out, "--persons", str(persons), "--frames", str(frames),
           "--size", str(size), "--seed", str(seed), "--videos", "2", "--extra-frames", "4"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def ray_env(tag: str, ray_tmp: str, **extra: str) -> dict:
    """Environment for a test's processes: its tag, its own Ray temp root, the venv first on PATH."""
    env = dict(os.environ)
    env.update({TAG_KEY: tag, "RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1",
                "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"})
    env.pop("RAY_ADDRESS", None)
    env.pop("PYTHONPATH", None)
    env.update(extra)
    return env


def marked_tree(key: str, value: str) -> list[int]:
    """The processes marked key=value and all their descendants. A process that sets its title with Python's
    setproctitle (Ray's dashboard and runtime-env agents: "ray::DashboardAgent") overwrites the memory that
    /proc/PID/environ shows, marker included; it is still its raylet's child, and is found as one."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # gone meanwhile
                continue
            children.setdefault(ppid, []).append(int(d))
    found, todo = set(), pids_with_env(key, value)
    while todo:
        pid = todo.pop()
        if pid not in found and pid != os.getpid():
            found.add(pid)
            todo.extend(children.get(pid, []))
    return sorted(found)


@contextmanager
def tagged(prefix: str = "rt"):
    """(tag, short Ray temp root); on exit every process carrying the tag (and its descendants) is stopped and
    the root removed."""
    tag = uuid.uuid4().hex[:12]
    ray_tmp = tempfile.mkdtemp(prefix=f"raytrain-{prefix}-", dir="/tmp")  # short: Ray's unix sockets live here
    try:
        yield tag, ray_tmp
    finally:
        stop_pids(marked_tree(TAG_KEY, tag))
        shutil.rmtree(ray_tmp, ignore_errors=True)


@dataclass
class Head:
    gcs: str
    dashboard: str
    temp_dir: str
    env: dict


def _ray_start(args: list[str], env: dict, launcher: list[str] | None = None) -> None:
    """`ray start ARGS` (or `LAUNCHER start ARGS`): it returns once the node is up, its daemons left running."""
    cmd = [*(launcher or [str(VENV_BIN / "ray")]), "start", "--disable-usage-stats", *args]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, f"ray start failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"


def _start_head(env: dict, ray_tmp: str, num_cpus: int) -> Head:
    gcs, dash, client, agent = free_ports(4)
    _ray_start(["--head", f"--port={gcs}", f"--num-cpus={num_cpus}", "--include-dashboard=true",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={ray_tmp}",
                "--node-ip-address=127.0.0.1", f"--ray-client-server-port={client}",
                f"--dashboard-agent-listen-port={agent}"], env)
    return Head(gcs=f"127.0.0.1:{gcs}", dashboard=f"http://127.0.0.1:{dash}", temp_dir=ray_tmp, env=env)


@contextmanager
def ray_head(num_cpus: int = 2):
    """A real Ray head on loopback with its dashboard (job submission needs it), private ports and temp dir."""
    with tagged("head") as (tag, ray_tmp):
        yield _start_head(ray_env(tag, ray_tmp), ray_tmp, num_cpus)


# `ray start --address` refuses to join a cluster when RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ("Multi-node Ray
# clusters are not supported on Windows and OSX"), and without that switch it rewrites 127.0.0.1 (the head's
# address and --node-ip-address alike) to the machine's outward address, where a loopback head is not. This
# launcher runs Ray's own CLI with the switch off everywhere (every daemon the node starts inherits it and
# binds 127.0.0.1) except in the CLI module's one guard.
_JOIN_ON_LOOPBACK = """
import sys, types
import ray._private.ray_constants as constants
from ray.scripts import scripts
scripts.ray_constants = types.SimpleNamespace(**{**vars(constants), "ENABLE_RAY_CLUSTER": True})
sys.exit(scripts.main())
"""
NODE_KEY = "POSETTP_RAYNODE"  # set on the second node's `ray start` only: its raylet and workers inherit it


@dataclass
class TwoNodes:
    head: Head
    node2_marker: str  # NODE_KEY=node2_marker: the second node's processes are these and their descendants
    node2_temp_dir: str

    def node2_pids(self) -> list[int]:
        """Every process of the second node: its raylet, log monitor, agents and workers."""
        return marked_tree(NODE_KEY, self.node2_marker)


@contextmanager
def ray_two_nodes(head_cpus: int = 2, node2_cpus: int = 1):
    """A head and a second node, separate Ray nodes (own raylet, object store, agents, temp dir, ports) on this
    machine, all on 127.0.0.1; the second node offers the custom resource {"node2": 1}. Workers find each other
    over gloo on loopback (GLOO_SOCKET_IFNAME=lo is in every node's environment, so in every worker's)."""
    with tagged("2n") as (tag, ray_tmp):
        env = ray_env(tag, ray_tmp, **LOOPBACK_ENV, GLOO_SOCKET_IFNAME="lo")
        head = _start_head(env, ray_tmp, head_cpus)
        marker, node2_tmp = f"{tag}-node2", os.path.join(ray_tmp, "n2")
        manager, objects, agent_http, agent_grpc, metrics, runtime_env = free_ports(6)
        _ray_start([f"--address={head.gcs}", "--node-ip-address=127.0.0.1", f"--num-cpus={node2_cpus}",
                    '--resources={"node2": 1}', f"--temp-dir={node2_tmp}", f"--node-manager-port={manager}",
                    f"--object-manager-port={objects}", f"--dashboard-agent-listen-port={agent_http}",
                    f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
                    f"--runtime-env-agent-port={runtime_env}", "--min-worker-port=0", "--max-worker-port=0"],
                   dict(env, **{NODE_KEY: marker}), launcher=[sys.executable, "-c", _JOIN_ON_LOOPBACK])
        yield TwoNodes(head=head, node2_marker=marker, node2_temp_dir=node2_tmp)


def run_joint(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python training/joint.py ARGS` from the repo root (as a user runs it), output captured."""
    return subprocess.run([sys.executable, "training/joint.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def joint_args(data: str, storage: str, name: str, extra_sets: list[str] | None = None, workers: int = 2) -> list[str]:
    sets = [f"data.url={data}", *TINY, *(extra_sets or [])]
    return ["--config", "configs/synth_small.yaml", *[a for s in sets for a in ("--set", s)],
            "--workers", str(workers), "--storage", storage, "--name", name]
