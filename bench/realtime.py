"""Real-time online TTP: per-frame prediction latency vs pure inference, and PCK vs synchronous online TTP.

Frames are fed at a fixed rate (a camera). Latencies are pooled over the persons' streams;
the PCK of the real-time predictions is compared with no TTP and with the synchronous
online mode on the same frames. Both TTP modes run with the safeguards that may skip
adaptation turned off, so that the latency is that of a stream under adaptation.

Run: .venv/bin/python -m bench.realtime [--checkpoint CK --data URL --persons 4]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from model.joints import PENN  # the synthetic persons' joints
from model.predict import predict_crops
from model.realtime import RealtimePersonalizer

from .common import always_adapting


def latencies(fn, crops, matrices, groups, fps: float) -> tuple[np.ndarray, np.ndarray]:
    """Feed frames at `fps`; returns per-frame latency (ms) and the predictions."""
    out, preds = [], []
    period = 1.0 / fps
    start = time.perf_counter()
    for i in range(len(crops)):
        wait = start + i * period - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        t0 = time.perf_counter()
        preds.append(fn(crops[i], matrices[i], int(groups[i])))
        out.append((time.perf_counter() - t0) * 1e3)
    return np.array(out), np.stack(preds)


def stream(model, recon, ttp, crops, matrices, groups, fps: float = 15.0) -> dict:
    """One person's stream, pure inference then real-time TTP (one inference thread, one adaptation thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pure, _ = latencies(lambda c, m, g: predict_crops(model, c[None], m[None])[0], crops, matrices, groups, fps)
        rt = RealtimePersonalizer(model, recon, always_adapting(ttp), adapt_threads=1)
        try:
            real, predictions = latencies(rt.predict, crops, matrices, groups, fps)
        finally:
            rt.close()
    finally:
        torch.set_num_threads(threads)
    return {"pure_ms": pure, "realtime_ms": real, "predictions": predictions, "updates": rt.updates}


def summary(pure: np.ndarray, real: np.ndarray) -> dict:
    return {"pure_infer_p50_ms": float(np.median(pure)), "pure_infer_p99_ms": float(np.percentile(pure, 99)),
            "realtime_infer_p50_ms": float(np.median(real)), "realtime_infer_p99_ms": float(np.percentile(real, 99)),
            "realtime_p99_ratio": float(np.percentile(real, 99) / np.percentile(pure, 99)), "frames": len(real)}


def with_pck(checkpoint: str, data: str, persons: int = 4, fps: float = 15.0) -> dict:
    """Latency percentiles pooled over `persons` test persons, and mean PCK@0.2: none / synchronous / real-time."""
    from core.checkpoints import model_with_loss
    from core.crops import prepare_frames
    from core.frames import labeled_person_frames
    from core.scoring import score
    from model.checkpoint import load_checkpoint
    from model.personalize import personalize

    ck = load_checkpoint(checkpoint)
    model, recon = model_with_loss(ck)
    ttp = always_adapting(ck.config.ttp)
    pure, real, pck, updates = [], [], {"none": [], "online_sync": [], "realtime": []}, 0
    for frames in labeled_person_frames(data, "test", persons).values():
        crops, matrices, groups = prepare_frames(frames, ck.config.model.image_size)
        run = stream(model, recon, ttp, crops, matrices, groups, fps)
        pure.append(run["pure_ms"])
        real.append(run["realtime_ms"])
        updates += run["updates"]
        sync = personalize(model, recon, crops, matrices, groups, ttp, "online").predictions
        for name, pred in (("none", predict_crops(model, crops, matrices)), ("online_sync", sync),
                           ("realtime", run["predictions"])):
            pck[name].append(score(pred, frames, PENN)["pck@0.2"])
    out = summary(np.concatenate(pure), np.concatenate(real))
    out.update({f"realtime_pck_{k}": float(np.mean(v)) for k, v in pck.items()},
               realtime_updates=updates, realtime_persons=len(pure), fps_fed=fps)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint")
    ap.add_argument("--data")
    ap.add_argument("--persons", type=int, default=4)
    ap.add_argument("--fps", type=float, default=15.0)
    args = ap.parse_args()
    if args.checkpoint and args.data:
        print(json.dumps(with_pck(args.checkpoint, args.data, args.persons, args.fps), indent=2))
        return
    from core.checkpoints import build_recon_loss
    from model.config import load_config
    from model.network import build_model

    cfg = load_config("configs/synth_small.yaml")  # untrained weights, random frames: latency only
    model = build_model(cfg.model).eval()
    recon = build_recon_loss(model, cfg).eval()
    n, s = 200, cfg.model.image_size
    matrices = np.tile(np.array([[1.0, 0, 0], [0, 1.0, 0]]), (n, 1, 1))
    run = stream(model, recon, cfg.ttp, torch.rand(n, 3, s, s), matrices, np.zeros(n, int), args.fps)
    print(json.dumps(summary(run["pure_ms"], run["realtime_ms"]) | {"realtime_updates": run["updates"]}, indent=2))


if __name__ == "__main__":
    main()
