"""Delta size vs PCK: fp32, fp16, int8 per-tensor (the wire formats) and int8 per-channel / top-k sparse
(what a smaller format would buy), on real offline-TTP deltas of unseen test persons.

Run: .venv/bin/python -m bench.deltas --checkpoint CK --data URL [--persons 8]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from core.checkpoints import model_with_loss
from core.frames import labeled_person_frames
from core.scoring import score
from model.checkpoint import load_checkpoint
from model.delta import apply_delta, deltable_keys, dequantize, encode_delta, extract_delta, quantize
from model.joints import PENN  # the synthetic persons' joints
from model.personalize import personalize
from model.predict import predict_crops

from .common import always_adapting

HEADER_BYTES = 600  # safetensors header + metadata, measured on encoded deltas of this size


def per_channel_int8(delta: dict) -> tuple[dict, int]:
    out, size = {}, 0
    for k, v in delta.items():
        flat = v.reshape(v.shape[0], -1) if v.dim() > 1 else v.reshape(1, -1)
        scale = flat.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
        out[k] = (torch.round(flat / scale).clamp(-127, 127) * scale).reshape(v.shape)
        size += v.numel() + 4 * scale.numel()
    return out, size + HEADER_BYTES


def top_k(delta: dict, fraction: float) -> tuple[dict, int]:
    """Keep the largest |delta| entries over all tensors (int8 values + int32 indices)."""
    flat = torch.cat([v.reshape(-1) for v in delta.values()])
    k = max(1, int(fraction * flat.numel()))
    threshold = flat.abs().kthvalue(flat.numel() - k + 1).values
    kept = {name: torch.where(v.abs() >= threshold, v, torch.zeros_like(v)) for name, v in delta.items()}
    stored, scales = quantize(kept, "int8")
    return dequantize(stored, scales), k * 5 + HEADER_BYTES


def run(checkpoint: str, data: str, persons: int, out_png: str | None = None) -> dict:
    ck = load_checkpoint(checkpoint)
    model, recon = model_with_loss(ck)
    ck_bytes = sum((Path(checkpoint) / f).stat().st_size for f in ("model.safetensors",))
    base = model.state_dict()
    keys = deltable_keys(base, {n for n, _ in model.named_parameters()})
    from core.crops import prepare_frames

    methods: dict[str, list] = {}
    sizes: dict[str, list] = {}
    for pid, frames in labeled_person_frames(data, "test", persons).items():
        crops, matrices, groups = prepare_frames(frames, ck.config.model.image_size)
        result = personalize(model, recon, crops, matrices, groups, always_adapting(ck.config.ttp), "offline", seed=0)
        delta = extract_delta(base, result.state, keys)
        variants = {}
        for dtype in ("fp32", "fp16", "int8"):
            stored, scales = quantize(delta, dtype)
            variants[dtype] = (dequantize(stored, scales), len(encode_delta(delta, dtype, ck.sha256, pid,
                                                                              "offline", 0, len(frames))))
        variants["int8_per_channel"] = per_channel_int8(delta)
        for frac in (0.1, 0.03, 0.01):
            variants[f"top{int(frac * 100)}%_int8"] = top_k(delta, frac)
        for name, (d, nbytes) in variants.items():
            tuned = type(model)(model.cfg)
            tuned.load_state_dict(apply_delta(base, d))
            methods.setdefault(name, []).append(score(predict_crops(tuned, crops, matrices), frames, PENN)["pck@0.2"])
            sizes.setdefault(name, []).append(nbytes)
    ref = np.array(methods["fp32"])
    table = {name: {"bytes": float(np.mean(sizes[name])), "ratio": float(np.mean(sizes[name]) / ck_bytes),
                    "pck@0.2": float(np.mean(v)), "pck_drop_points": float((ref - np.array(v)).mean() * 100),
                    "max_person_drop_points": float((ref - np.array(v)).max() * 100)}
             for name, v in methods.items()}
    if out_png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        for name, row in table.items():
            ax.scatter(row["ratio"] * 100, row["pck@0.2"] * 100)
            ax.annotate(name, (row["ratio"] * 100, row["pck@0.2"] * 100), fontsize=7)
        ax.axvline(10, color="k", lw=0.5, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("delta size (% of checkpoint)")
        ax.set_ylabel("PCK@0.2 (%)")
        ax.set_title("delta size vs accuracy")
        fig.tight_layout()
        fig.savefig(out_png, dpi=120)
        plt.close(fig)
    return {"checkpoint_bytes": ck_bytes, "methods": table, "persons": len(ref)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--persons", type=int, default=8)
    ap.add_argument("--png", default="bench/delta_tradeoff.png")
    args = ap.parse_args()
    print(json.dumps(run(args.checkpoint, args.data, args.persons, args.png), indent=2))


if __name__ == "__main__":
    main()
