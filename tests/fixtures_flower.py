"""Helpers for the Flower tests: a tiny checkpoint, tiny test shards, isolated Flower/Ray
environments, free ports and stopping exactly the processes a test started."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from posettp import procs
from posettp.procs import MarkedTreeWatch, pids_with_env, stop_pids
from tests.test_personalize import calibrate_norm_statistics

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

TINY_OVERRIDES = ["ttp.batch_size=4", "ttp.steps=4", "ttp.guard=false", "ttp.min_pose_signal=0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args[0]} exited with {proc.returncode} before port {port} opened")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"port {port} did not open within {timeout}s")


def make_checkpoint(url: str, overrides: list[str] | None = None, seed: int = 0) -> str:
    """An untrained synth_small checkpoint whose norm statistics and loss means are fitted to
    random crops (an untrained BatchNorm's 0/1 statistics make eval activations vanish)."""
    from core.checkpoints import build_recon_loss
    from model.checkpoint import save_checkpoint
    from model.config import load_config
    from model.network import build_model

    cfg = load_config(str(REPO / "configs/synth_small.yaml"), TINY_OVERRIDES + list(overrides or []))
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    s = cfg.model.image_size
    crops = torch.rand(16, 3, s, s, generator=torch.Generator().manual_seed(seed))
    calibrate_norm_statistics(model, crops)
    recon = build_recon_loss(model, cfg)
    if recon is not None:
        recon(crops[:4], crops[4:8], update_means=True)
    return save_checkpoint(url, model, cfg, step=0, loss_module=recon, extra={"note": "test fixture"})


def make_shards(url: str, persons: int, frames: int, size: int = 64, seed: int = 0) -> None:
    """Test shards (2 videos of `frames` frames per person, split test) through the documented `posettp synth` command; random frames if it is not built."""
    cmd = [str(VENV_BIN / "posettp"), "synth", "--out", url, "--persons", str(persons), "--frames", str(frames),
           "--size", str(size), "--seed", str(seed), "--split", "test", "--videos", "2", "--extra-frames", "0"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    if res.returncode == 0:
        return
    if res.returncode != 2:  # 2 = "not built yet"
        raise RuntimeError(f"posettp synth failed: {res.stderr[-2000:]}")
    write_random_shards(url, persons, frames, size, seed)


def random_rows(persons: int, frames: int, size: int, seed: int):
    from data.shards import encode_jpeg

    rng = np.random.default_rng(seed)
    for p in range(persons):
        base = rng.integers(0, 255, (size // 8, size // 8, 3)).astype(np.float32)
        for v in range(2):
            for t in range(frames):
                img = np.kron(base, np.ones((8, 8, 1))) + rng.normal(0, 12, (size, size, 3)) + 3 * t
                kp = np.concatenate([rng.uniform(size * 0.2, size * 0.8, (13, 2)), np.ones((13, 1))], 1)
                yield {"person_id": f"p{p:03d}", "video_id": f"p{p:03d}_v{v}", "frame": t,
                       "image": encode_jpeg(np.clip(img, 0, 255).astype(np.uint8)), "width": size, "height": size,
                       "keypoints": kp.astype(np.float32).reshape(-1), "bbox": [0, 0, size, size], "split": "test"}


def write_random_shards(url: str, persons: int, frames: int, size: int = 64, seed: int = 0) -> None:
    from data.shards import write_shards

    joints = ["head", "l_shoulder", "r_shoulder", "l_elbow", "r_elbow", "l_wrist", "r_wrist", "l_hip", "r_hip",
              "l_knee", "r_knee", "l_ankle", "r_ankle"]
    write_shards(random_rows(persons, frames, size, seed), url, {"dataset": "synth", "joints": joints})


def write_image_folder(frames: list, folder: str) -> None:
    import cv2

    os.makedirs(folder, exist_ok=True)
    for i, f in enumerate(frames):
        cv2.imwrite(os.path.join(folder, f"{i:05d}.png"), cv2.cvtColor(f.image, cv2.COLOR_RGB2BGR))


def flower_env(home: Path, **extra: str) -> dict:
    """The product's Flower environment with its own local-SuperLink ports and its own Ray temp dir, so that
    tests never meet each other's SuperLink or raylets."""
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's unix sockets live under it
    return procs.flower_env(home, FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
                            FLWR_LOCAL_CONTROL_API_PORT=str(free_port()), RAY_TMPDIR=ray_tmp, **extra)


def stop_tree_by_env(home: Path) -> list[int]:
    """Stop every process started with FLWR_HOME=home (detached SuperLink, ServerApp, Ray, ...)."""
    pids = pids_with_env("FLWR_HOME", str(home))
    stop_pids(pids)
    return pids


def write_flwr_config(home: Path, connections: dict[str, dict]) -> None:
    """`$FLWR_HOME/config.toml` with the given `[superlink.<name>]` sections (first one is the default)."""
    import tomli_w

    home.mkdir(parents=True, exist_ok=True)
    doc = {"superlink": {"default": next(iter(connections)), **connections}}
    (home / "config.toml").write_text(tomli_w.dumps(doc))


def TreeMemory(home: Path, every: float = 1.0) -> MarkedTreeWatch:
    """Peak summed RSS of every process started with FLWR_HOME=home (SuperLink, ServerApp, Ray, ClientApps)."""
    return MarkedTreeWatch("FLWR_HOME", str(home), every)
