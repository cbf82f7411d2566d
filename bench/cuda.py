"""The GPU against the CPU of the same machine: joint-training step, TTP step and prediction latency.

The steps are the product's own (`training.loop.train_step`, `model.personalize._Adapter.step`,
`model.predict.predict_crops`) on random batches, so data loading is left out; every timed
call ends in a host sync (a loss read back or predictions copied to numpy). Each row is a
median over repeats after warm-up, fp32 ("off") and bf16 autocast alike, TF32 left at
torch's defaults (on for cuDNN convolutions, off for matmuls).

Run (where torch sees a GPU): python -m bench.cuda [--out bench/cuda.json]
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace

import numpy as np
import torch

from model.config import load_config
from model.personalize import _Adapter
from model.predict import predict_crops
from training.loop import build_training, train_step

from .common import machine, median_ms

CONFIGS = {"synth_small": "configs/synth_small.yaml", "synth_paper": "configs/synth_paper.yaml"}


def random_batch(cfg, batch_size: int) -> dict:
    s, j = cfg.model.image_size, cfg.model.num_joints
    return {"target": torch.rand(batch_size, 3, s, s), "source": torch.rand(batch_size, 3, s, s),
            "joints": torch.rand(batch_size, j, 2) * s, "visible": torch.ones(batch_size, j)}


def measure(name: str, device: torch.device, amp: str, repeats: int) -> dict:
    # train.threads=0: torch's default thread count, the whole CPU against the GPU (synth_small asks for one)
    cfg = load_config(CONFIGS[name], [f"train.amp={amp}", f"ttp.amp={amp}", "train.threads=0"])
    model, recon, optimizer = build_training(cfg, device)
    batch = random_batch(cfg, cfg.train.batch_size)
    row = {"train_batch": cfg.train.batch_size,
           "train_step_ms": median_ms(lambda: train_step(model, recon, optimizer, batch, 0, cfg), repeats)}
    row["train_img_per_s"] = cfg.train.batch_size / row["train_step_ms"] * 1e3
    model.eval()
    s, b = cfg.model.image_size, cfg.ttp.batch_size
    adapter = _Adapter(model, recon, replace(cfg.ttp, amp=amp))
    target, source = torch.rand(b, 3, s, s, device=device), torch.rand(b, 3, s, s, device=device)
    row.update(ttp_batch=b, ttp_step_ms=median_ms(lambda: adapter.step(target, source), repeats))
    crops, matrices = torch.rand(64, 3, s, s, device=device), np.tile(np.eye(2, 3), (64, 1, 1))
    row["predict_b1_ms"] = median_ms(lambda: predict_crops(model, crops[:1], matrices[:1]), repeats * 3)
    row["predict_b64_ms"] = median_ms(lambda: predict_crops(model, crops, matrices), repeats)
    return row


def run(repeats: int = 9, cpu_paper: bool = True) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("bench.cuda needs a CUDA GPU")
    out = {"machine": {**machine(), "gpu": torch.cuda.get_device_name()}, "rows": []}
    for name in CONFIGS:
        for device in ("cuda", "cpu"):
            if device == "cpu" and name == "synth_paper" and not cpu_paper:
                continue
            for amp in ("off", "bf16"):
                row = {"config": name, "device": device, "amp": amp,
                       **measure(name, torch.device(device), amp, repeats if device == "cuda" else 3)}
                out["rows"].append(row)
                print(json.dumps(row, default=lambda x: round(x, 2)), flush=True)
    return out


def markdown(result: dict) -> str:
    keys = ["train_step_ms", "train_img_per_s", "ttp_step_ms", "predict_b1_ms", "predict_b64_ms"]
    lines = ["| config | device | amp | " + " | ".join(keys) + " |", "|" + " --- |" * (3 + len(keys))]
    for r in result["rows"]:
        lines.append(f"| {r['config']} | {r['device']} | {r['amp']} | " + " | ".join(f"{r[k]:.1f}" for k in keys) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench/cuda.json")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--no-cpu-paper", action="store_true", help="skip the slow paper-size model on the CPU")
    args = p.parse_args()
    result = run(args.repeats, cpu_paper=not args.no_cpu_paper)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(markdown(result))
