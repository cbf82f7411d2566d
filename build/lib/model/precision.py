"""Mixed precision where the hardware runs bf16 natively, one rule for training and TTP.

bf16 autocast halves the cost of the convolutions only where the hardware has bf16
arithmetic (CUDA GPUs with bf16, CPUs with AVX512-BF16/AMX through oneDNN); elsewhere
it is emulated and slower, so "auto" turns it off there. Master weights, the
optimizer state and every loss stay fp32 either way.
"""
from __future__ import annotations

import contextlib

import torch

from .config import AMP_MODES


def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # a private oneDNN query: absent from some builds
            return False
    return False


def use_bf16(device: torch.device, mode: str) -> bool:
    """Whether `mode` means bf16 on `device`."""
    if mode not in AMP_MODES:
        raise ValueError(f"amp must be one of {AMP_MODES}, got {mode!r}")
    if mode == "auto":
        return native_bf16(device)
    return mode == "bf16"


def autocast(device: torch.device, mode: str):
    if use_bf16(device, mode):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
