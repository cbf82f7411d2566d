"""Real-time online TTP: per-frame prediction latency vs pure inference, and PCK vs synchronous online.

Run: .venv/bin/python -m bench.realtime [--data URL --checkpoint CK]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from model.config import load_config
from model.network import build_model
from model.predict import predict_crops
from model.realtime import RealtimePersonalizer
from training.loop import build_recon_loss

from .common import always_adapting


def latencies(fn, crops, matrices, groups, fps: float) -> np.ndarray:
    """Feed frames at a fixed rate (a camera), returning per-frame latency in ms."""
    out = []
    period = 1.0 / fps
    start = time.perf_counter()
    for i in range(len(crops)):
        wait = start + i * period - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        t0 = time.perf_counter()
        fn(crops[i], matrices[i], int(groups[i]))
        out.append((time.perf_counter() - t0) * 1e3)
    return np.array(out)


def measure(model, recon, cfg, crops, matrices, groups, fps: float = 15.0) -> dict:
    torch.set_num_threads(1)
    pure = latencies(lambda c, m, g: predict_crops(model, c[None], m[None]), crops, matrices, groups, fps)
    rt = RealtimePersonalizer(model, recon, always_adapting(cfg.ttp), adapt_threads=1)
    try:
        real = latencies(rt.predict, crops, matrices, groups, fps)
    finally:
        rt.close()
    return {"pure_infer_p50_ms": float(np.median(pure)), "pure_infer_p99_ms": float(np.percentile(pure, 99)),
            "realtime_infer_p50_ms": float(np.median(real)), "realtime_infer_p99_ms": float(np.percentile(real, 99)),
            "realtime_updates": rt.updates, "frames": len(crops), "fps_fed": fps,
            "realtime_p99_ratio": float(np.percentile(real, 99) / np.percentile(pure, 99))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--fps", type=float, default=15.0)
    args = ap.parse_args()
    cfg = load_config("configs/synth_small.yaml")
    model = build_model(cfg.model).eval()
    recon = build_recon_loss(model, cfg).eval()
    s = cfg.model.image_size
    crops = torch.rand(args.frames, 3, s, s)
    matrices = np.tile(np.array([[1.0, 0, 0], [0, 1.0, 0]]), (args.frames, 1, 1))
    print(json.dumps(measure(model, recon, cfg, crops, matrices, np.zeros(args.frames, int), args.fps), indent=2))


if __name__ == "__main__":
    main()
