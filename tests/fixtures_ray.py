"""Helpers for the Ray Train tests: a tiny synth dataset, a private Ray head on loopback, joint.py runs,
and stopping exactly the processes a test started.

Every process a test starts carries POSETTP_RAYTEST=<tag> in its environment (Ray's daemons and
workers inherit it), so teardown finds and stops those PIDs and nothing else: never `ray stop`.
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


@contextmanager
def tagged(prefix: str = "rt"):
    """(tag, short Ray temp root); on exit every process carrying the tag is stopped and the root removed."""
    tag = uuid.uuid4().hex[:12]
    ray_tmp = tempfile.mkdtemp(prefix=f"raytrain-{prefix}-", dir="/tmp")  # short: Ray's unix sockets live here
    try:
        yield tag, ray_tmp
    finally:
        stop_pids(pids_with_env(TAG_KEY, tag))
        shutil.rmtree(ray_tmp, ignore_errors=True)


@dataclass
class Head:
    gcs: str
    dashboard: str
    temp_dir: str
    env: dict


@contextmanager
def ray_head(num_cpus: int = 2):
    """A real Ray head on loopback with its dashboard (job submission needs it), private ports and temp dir."""
    with tagged("head") as (tag, ray_tmp):
        gcs, dash, client, agent = free_ports(4)
        env = ray_env(tag, ray_tmp)
        cmd = [str(VENV_BIN / "ray"), "start", "--head", f"--port={gcs}", f"--num-cpus={num_cpus}",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
               f"--temp-dir={ray_tmp}", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
               f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}"]
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
        assert res.returncode == 0, f"ray start failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
        yield Head(gcs=f"127.0.0.1:{gcs}", dashboard=f"http://127.0.0.1:{dash}", temp_dir=ray_tmp, env=env)


def run_joint(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python training/joint.py ARGS` from the repo root (as a user runs it), output captured."""
    return subprocess.run([sys.executable, "training/joint.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def joint_args(data: str, storage: str, name: str, extra_sets: list[str] | None = None, workers: int = 2) -> list[str]:
    sets = [f"data.url={data}", *TINY, *(extra_sets or [])]
    return ["--config", "configs/synth_small.yaml", *[a for s in sets for a in ("--set", s)],
            "--workers", str(workers), "--storage", storage, "--name", name]
