"""Helpers shared by the serving tests and bench/serve_latency.py: a tiny checkpoint, person deltas in a
store, test images, reference predictions made offline, and a `posettp serve` subprocess."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import cv2
import numpy as np
import torch

from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import load_config
from model.delta import apply_delta, deltable_keys, encode_delta, extract_delta
from model.network import build_model
from model.predict import predict_crops
from model.transforms import crop_matrix, full_image_bbox, to_tensor_layout, warp
from store.deltas import DeltaStore
from store.policy import DeltaPolicy

REPO = Path(__file__).resolve().parents[1]


def make_checkpoint(url: str, image_size: int | None = None, seed: int = 0,
                    config: str = "configs/synth_small.yaml") -> str:
    """A checkpoint (synth_small unless `config` says otherwise) with fitted BatchNorm statistics and a
    self-head that gives distinct peaks."""
    # no trust region: the fixture's deltas are large synthetic perturbations that visibly change predictions,
    # not TTP updates, and the store's policy holds deltas to the checkpoint's trust region
    overrides = ["ttp.drift_steps=0"] + ([f"model.image_size={image_size}"] if image_size else [])
    cfg = load_config(str(REPO / config), overrides)
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    torch.nn.init.normal_(model.self_head.weight, std=0.05)
    for m in model.modules():  # an untrained model's BN stats (0/1) make eval activations vanish: fit them
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        model.pose(torch.rand(16, 3, cfg.model.image_size, cfg.model.image_size, generator=gen))
    model.eval()
    return save_checkpoint(url, model, cfg)


def make_delta(model, base_sha: str, person_id: str, seed: int, scale: float = 0.15, dtype: str = "fp16") -> bytes:
    """Encoder/self-head perturbed by `scale` x each tensor's std, encoded as a delta."""
    state = model.state_dict()
    keys = deltable_keys(state, {n for n, _ in model.named_parameters()})
    gen = torch.Generator().manual_seed(seed)
    personal = dict(state)
    for k in keys:
        v = state[k]
        std = float(v.float().std()) if v.numel() > 1 else float(v.abs().mean())
        personal[k] = v + scale * (std or 1e-2) * torch.randn(v.shape, generator=gen)
    return encode_delta(extract_delta(state, personal, keys), dtype, base_sha, person_id, "offline", 10, 20)


def land_delta(store_url: str, ck_url: str, person_id: str, seed: int, **kw) -> dict:
    """File a new delta version for a person through the store's validation; returns latest.json."""
    ck = load_checkpoint(ck_url)
    store = DeltaStore(store_url, DeltaPolicy.for_checkpoint(ck))
    return store.file_delta(person_id, make_delta(ck.model, ck.sha256, person_id, seed, **kw))


def person_model(ck_url: str, store_url: str, person_id: str):
    """The person's model the offline way (`posettp evaluate --store`): base + latest delta, loaded fully."""
    ck = load_checkpoint(ck_url)
    found = DeltaStore(store_url, DeltaPolicy.for_checkpoint(ck)).load_latest(person_id)
    model = ck.model
    version = "base"
    if found:
        delta, _, record = found
        model = type(ck.model)(ck.model.cfg)
        model.load_state_dict(apply_delta(ck.model.state_dict(), delta))
        version = record["version"]
    return model.eval(), version


def make_image(seed: int, width: int = 96, height: int = 80, fmt: str = "png") -> bytes:
    """A smooth random RGB image with a few blobs, encoded as PNG or JPEG."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.zeros((height, width, 3), np.float32) + rng.uniform(0, 80, 3)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(4, 20)
        img += rng.uniform(40, 200, 3) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
    rgb = np.clip(img, 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg" if fmt == "jpg" else ".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def png_with_header(width: int, height: int) -> bytes:
    """A well-formed PNG header claiming any size (0x0, gigantic) with almost no pixel data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def reference_keypoints(model, image_bytes: bytes, bbox=None) -> np.ndarray:
    """(J, 3) offline prediction for an encoded image: decoded like data.sources, cropped, predict_crops."""
    rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(image_bytes, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    h, w = rgb.shape[:2]
    m = crop_matrix(bbox if bbox is not None else full_image_bbox(w, h), model.cfg.image_size)
    crop = torch.from_numpy(to_tensor_layout(warp(rgb, m, model.cfg.image_size)))[None]
    return predict_crops(model, crop, m[None])[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_serve_config(path: str, **args) -> str:
    """A Serve config file like configs/serve.yaml with the given app args."""
    import yaml

    cfg = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": 8100},
           "applications": [{"name": "posettp", "route_prefix": "/", "import_path": "server.serve:build_app",
                             "args": args}]}
    Path(path).write_text(yaml.safe_dump(cfg))
    return path


def session_processes(sid: int) -> list[int]:
    """PIDs of live processes in session `sid` (a `posettp serve` started with start_new_session)."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(p.name))
    return out


class ServeProcess:
    """`posettp serve` in a subprocess with its own Ray temp dir, on 127.0.0.1 and a free port."""

    def __init__(self, checkpoint: str, store: str, config: str, log_path: str, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.temp_dir = tempfile.mkdtemp(prefix="pst-ray-", dir="/tmp")
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        env.update(POSETTP_RAY_TEMP_DIR=self.temp_dir, RAY_DISABLE_USAGE_STATS="1", RAY_USAGE_STATS_ENABLED="0",
                   PYTHONUNBUFFERED="1")
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "posettp.cli", "serve", "--checkpoint", checkpoint, "--store", store,
             "--host", "127.0.0.1", "--port", str(self.port), "--config", config],
            cwd=str(REPO), env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 180.0) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"posettp serve exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=5) as r:
                    if r.status == 200:
                        return json.loads(r.read())
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"posettp serve not ready after {timeout}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 90.0) -> int:
        """SIGTERM, wait; returns the exit code (kills this session's processes only if it hangs)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def leftovers(self, wait: float = 20.0) -> list[int]:
        deadline = time.time() + wait
        while True:
            left = session_processes(self.proc.pid)
            if not left or time.time() > deadline:
                return left
            time.sleep(0.5)

    def kill_leftovers(self) -> None:
        for pid in session_processes(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def shutdown(self) -> tuple[int, list[int], str]:
        """Stop, collect and kill leftovers, drop the Ray temp dir: (exit code, leftover pids, log tail)."""
        rc = self.stop()
        left = self.leftovers()
        self.kill_leftovers()
        log = self.log_tail()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return rc, left, log
