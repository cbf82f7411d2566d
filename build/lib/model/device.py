"""Where a model runs: the GPU when there is one, else the CPU, one rule for every command.

Training, evaluation and TTP are written device-agnostic; this picks the device
once per process so that `posettp reproduce`, `posettp evaluate`, `posettp personalize` and the
Flower clients all use a GPU when present without each carrying its own test.
"""
from __future__ import annotations

import torch

DEVICES = ("auto", "cpu", "cuda")


def pick_device(name: str | None = "auto") -> torch.device:
    """"auto" (or None): CUDA when available, else the CPU; "cuda" without a GPU is an error, not a fallback."""
    name = name or "auto"
    if name not in DEVICES and not name.startswith("cuda:"):
        raise ValueError(f"device must be one of {DEVICES} (or cuda:N), got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA GPU")
    return torch.device(name)
