"""PCK (Penn Action / Human3.6M, torso-normalised) and BBC Pose mAcc.

Visible joints only. A frame whose torso length is zero (or whose shoulders or
hips are not visible) cannot be normalised and is excluded rather than scored.
"""
from __future__ import annotations

import numpy as np

# Penn Action indices: shoulders 1, 2; hips 7, 8
PENN_SHOULDERS = (1, 2)
PENN_HIPS = (7, 8)


def torso_lengths(gt: np.ndarray, vis: np.ndarray, shoulders=PENN_SHOULDERS, hips=PENN_HIPS) -> np.ndarray:
    """Shoulder-centre to hip-centre distance per frame; 0 where it cannot be measured."""
    gt = np.asarray(gt, dtype=np.float64)
    vis = np.asarray(vis) > 0
    sc = gt[:, list(shoulders)].mean(axis=1)
    hc = gt[:, list(hips)].mean(axis=1)
    ok = vis[:, list(shoulders)].all(axis=1) & vis[:, list(hips)].all(axis=1)
    return np.where(ok, np.linalg.norm(sc - hc, axis=-1), 0.0)


def pck_hits(pred: np.ndarray, gt: np.ndarray, vis: np.ndarray, alpha: float = 0.2, torso=None):
    """Per-joint hits (N, J) and a mask (N, J) of joints that count."""
    pred = np.asarray(pred, dtype=np.float64)[..., :2]
    gt = np.asarray(gt, dtype=np.float64)[..., :2]
    vis = np.asarray(vis) > 0
    torso = torso_lengths(gt, vis) if torso is None else np.asarray(torso, dtype=np.float64)
    mask = vis & (torso[:, None] > 0)
    dist = np.linalg.norm(pred - gt, axis=-1)
    hits = (dist <= alpha * torso[:, None]) & mask
    return hits, mask


def pck(pred, gt, vis, alpha: float = 0.2, torso=None) -> dict:
    """{"mean": x, "per_joint": [..], "count": n}; mean over all counted joints."""
    hits, mask = pck_hits(pred, gt, vis, alpha, torso)
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
