"""PCK against a per-frame normalising length (the torso, or the person box) and BBC Pose mAcc.

Visible joints only. A frame whose normalising length is zero (for the torso: shoulders or hips not
visible) cannot be normalised and is excluded rather than scored. Which length and which joints a dataset
uses is its joint set's (`model.joints`).
"""
from __future__ import annotations

import numpy as np

def torso_lengths(gt: np.ndarray, vis: np.ndarray, shoulders, hips) -> np.ndarray:
    """Shoulder-centre to hip-centre distance per frame; 0 where it cannot be measured."""
    gt = np.asarray(gt, dtype=np.float64)
    vis = np.asarray(vis) > 0
    sc = gt[:, list(shoulders)].mean(axis=1)
    hc = gt[:, list(hips)].mean(axis=1)
    ok = vis[:, list(shoulders)].all(axis=1) & vis[:, list(hips)].all(axis=1)
    return np.where(ok, np.linalg.norm(sc - hc, axis=-1), 0.0)


def pck_hits(pred: np.ndarray, gt: np.ndarray, vis: np.ndarray, alpha: float, norm: np.ndarray):
    """Per-joint hits (N, J) and a mask (N, J) of joints that count; `norm` is each frame's length."""
    pred = np.asarray(pred, dtype=np.float64)[..., :2]
    gt = np.asarray(gt, dtype=np.float64)[..., :2]
    vis = np.asarray(vis) > 0
    norm = np.asarray(norm, dtype=np.float64)
    mask = vis & (norm[:, None] > 0)
    dist = np.linalg.norm(pred - gt, axis=-1)
    hits = (dist <= alpha * norm[:, None]) & mask
    return hits, mask


def pck(pred, gt, vis, alpha: float, norm: np.ndarray) -> dict:
    """{"mean": x, "per_joint": [..], "count": n}; mean over all counted joints."""
    hits, mask = pck_hits(pred, gt, vis, alpha, norm)
    per_joint = np.where(mask.sum(0) > 0, hits.sum(0) / np.maximum(mask.sum(0), 1), np.nan)
    count = int(mask.sum())
    mean = float(hits.sum() / count) if count else float("nan")
    return {"mean": mean, "per_joint": per_joint.tolist(), "count": count}


def bbc_macc(pred, gt, vis=None, threshold_px: float = 6.0, downscale: float = 2.0) -> dict:
    """BBC Pose accuracy: a joint is correct within 6 px at half resolution."""
    pred = np.asarray(pred, dtype=np.float64)[..., :2]
    gt = np.asarray(gt, dtype=np.float64)[..., :2]
    vis = np.ones(gt.shape[:2], bool) if vis is None else np.asarray(vis) > 0
    dist = np.linalg.norm(pred - gt, axis=-1) / downscale
    hits = (dist <= threshold_px) & vis
    per_joint = hits.sum(0) / np.maximum(vis.sum(0), 1)
    count = int(vis.sum())
    return {"mean": float(hits.sum() / count) if count else float("nan"), "per_joint": per_joint.tolist(), "count": count}
