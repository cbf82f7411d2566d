"""What the TTP loss can see, set against what is wrong with the base model's poses.

1. Error structure on held-out persons: PCK@0.2 of the base model, and what it would be if the mean error of
   each joint were removed per person or per video (oracles: they use the labels, which TTP never sees). A large
   per-video share means the errors are mostly a steady offset of each joint within a video.
2. How the self-supervised loss responds, on probe pairs of the same persons, to (a) swapping the keypoints
   between frames (the pose signal the safeguard checks) and (b) moving every keypoint by a fixed random offset
   in both frames of a pair: the shape of a per-video bias. A loss blind to (b) cannot correct such a bias,
   whatever the optimiser does.

Run: .venv/bin/python -m experiments.ttp_signal --checkpoint CK --data URL [--split test --persons 30]
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from core.checkpoints import model_with_loss
from core.crops import prepare_frames
from core.frames import labeled_person_frames
from model.checkpoint import load_checkpoint
from model.joints import PENN
from model.metrics import pck, torso_lengths
from model.network import PoseTTPNet
from model.objectives import self_loss
from model.personalize import probe_pairs
from model.predict import predict_crops


class OffsetKeypoints(PoseTTPNet):
    """The same network with a fixed (K, 2) heatmap-pixel offset added to every condensed keypoint (target
    and source alike); the instance's class is swapped in and out, no weights are copied."""

    offset: torch.Tensor | None = None

    def keypoint_coords(self, h_self: torch.Tensor) -> torch.Tensor:
        coords = super().keypoint_coords(h_self)
        return coords if self.offset is None else coords + self.offset


def synth_pck(pred: np.ndarray, gt: np.ndarray, vis: np.ndarray) -> float:
    """PCK@0.2 of the synthetic persons (Penn Action's joints and torso)."""
    return pck(pred, gt, vis, 0.2, torso_lengths(gt, vis, *PENN.torso))["mean"]


def bias_free_pck(pred: np.ndarray, gt: np.ndarray, vis: np.ndarray, groups: np.ndarray) -> float:
    """PCK after subtracting, within each group, each joint's mean error over its visible frames."""
    err = np.where(vis[..., None] > 0, pred - gt, np.nan)
    corrected = pred.copy()
    for g in np.unique(groups):
        rows = groups == g
        with np.errstate(invalid="ignore"):
            bias = np.nan_to_num(np.nanmean(err[rows], axis=0))
        corrected[rows] = pred[rows] - bias
    return synth_pck(corrected, gt, vis)


def error_structure(model: PoseTTPNet, frames: list, image_size: int) -> dict[str, float]:
    crops, matrices, groups = prepare_frames(frames, image_size)
    pred = predict_crops(model, crops, matrices)[..., :2].astype(np.float64)
    gt = np.stack([f.keypoints for f in frames]).astype(np.float64)
    vis, gt = gt[..., 2], gt[..., :2]
    motion = [np.linalg.norm(gt[groups == g] - gt[groups == g].mean(0), axis=-1).mean() for g in np.unique(groups)]
    return {"pck": synth_pck(pred, gt, vis),
            "pck_person_bias_removed": bias_free_pck(pred, gt, vis, np.zeros(len(frames))),
            "pck_video_bias_removed": bias_free_pck(pred, gt, vis, groups),
            "joint_motion_px": float(np.mean(motion)),
            "mean_error_px": float(np.nanmean(np.where(vis > 0, np.linalg.norm(pred - gt, axis=-1), np.nan)))}


@torch.no_grad()
def loss_response(model: PoseTTPNet, recon_loss, frames: list, image_size: int, offsets_hm=(0.5, 1.0),
                  draws: int = 4, batch: int = 16) -> dict[str, float]:
    """Loss ratios against the loss of the model's own keypoints (1.0 = blind); offsets in heatmap px."""
    crops, _, groups = prepare_frames(frames, image_size)
    target, source = probe_pairs(crops, groups, len(crops), batch, seed=0)
    h_self = model.self_logits(target)

    def loss(h=h_self) -> float:
        return float(self_loss(model, recon_loss, target, source, h_self=h, update_means=False)[0])

    own = loss()
    out = {"swap": loss(h_self.roll(1, 0)) / own}
    gen = torch.Generator().manual_seed(1)
    model.__class__ = OffsetKeypoints
    try:
        for size in offsets_hm:
            ratios = []
            for _ in range(draws):
                angle = torch.rand(model.cfg.num_keypoints, generator=gen) * 2 * torch.pi
                model.offset = size * torch.stack([angle.cos(), angle.sin()], -1)
                ratios.append(loss() / own)
            out[f"offset_{size:g}"] = float(np.mean(ratios))
    finally:
        model.__class__ = PoseTTPNet
        model.__dict__.pop("offset", None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--persons", type=int, default=30)
    ap.add_argument("--out", default="", help="write the per-person rows and medians as JSON here")
    args = ap.parse_args()
    ck = load_checkpoint(args.checkpoint)
    model, recon_loss = model_with_loss(ck)
    size = ck.config.model.image_size
    rows = []
    for pid, frames in labeled_person_frames(args.data, args.split, limit=args.persons).items():
        row = {"person_id": pid, **error_structure(model, frames, size)}
        if model.has_reconstruction:
            row.update(loss_response(model, recon_loss, frames, size))
        rows.append(row)
        print(" ".join(f"{k} {v:.3f}" if isinstance(v, float) else str(v) for k, v in row.items()), flush=True)
    keys = [k for k in rows[0] if k != "person_id"]
    summary = {"means": {k: float(np.mean([r[k] for r in rows])) for k in keys if not k.startswith(("swap", "offset"))},
               "medians": {k: float(np.median([r[k] for r in rows])) for k in keys if k.startswith(("swap", "offset"))}}
    print(json.dumps(summary, indent=1))
    print("offset_D: every keypoint moved by D heatmap px (x", size // model.heatmap_size, "crop px) in a random",
          "direction, in both frames of each pair; ratios to the loss of the model's own keypoints")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "summary": summary, "persons": rows}, f, indent=1)


if __name__ == "__main__":
    main()
