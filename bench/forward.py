"""Pose forward time per image (encoder + self_head + sup_head) for synth_small and paper-size ResNet-18.

Run: .venv/bin/python -m bench.forward
"""
from __future__ import annotations

import json

import torch

from model.config import load_config
from model.network import build_model, pose_gflops

from .common import machine, median_ms

CONFIGS = {"synth_small": ("configs/synth_small.yaml", []),
           "paper_resnet18": ("configs/synth_paper.yaml", [])}


def forward_ms(config: str, overrides: list[str], batch: int = 1) -> tuple[float, float]:
    cfg = load_config(config, overrides)
    model = build_model(cfg.model).eval()
    x = torch.rand(batch, 3, cfg.model.image_size, cfg.model.image_size)
    with torch.inference_mode():
        ms = median_ms(lambda: model.pose(x), repeats=15)
    return ms / batch, pose_gflops(model)


def run() -> dict:
    out = {"machine": machine()}
    for name, (path, overrides) in CONFIGS.items():
        for batch in (1, 32):
            ms, gflops = forward_ms(path, overrides, batch)
            out[f"forward_ms_{name}_b{batch}"] = round(ms, 3)
        out[f"gflops_{name}"] = round(gflops, 3)
    out["forward_ms_small"] = out["forward_ms_synth_small_b1"]
    return out


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
