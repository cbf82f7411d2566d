"""Scoring a person: predictions (with or without TTP) against labels, in the dataset's metric.

Every experiment is built from per-person scores, so they are computed here once: evaluation, reproduce,
the demo, the Flower server's check of an averaged base and the benches all call `evaluate_person`.
"""
from __future__ import annotations

import numpy as np

from model.augment import Augmentation
from model.config import Config
from model.joints import JointSet, JointSetMismatch, joint_set
from model.metrics import bbc_macc, pck, pck_hits, torso_lengths
from model.personalize import personalize
from model.predict import predict_crops

from .checkpoints import with_weights
from .crops import prepare_frames


def _scored(joints: JointSet, frames: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gt xy, visible, per-frame normalising length) for the joint set's metric; unscored joints invisible."""
    gt = np.stack([f.keypoints for f in frames]).astype(np.float64)
    if gt.shape[1] != joints.size:
        raise JointSetMismatch(f"frames have {gt.shape[1]} joints, the {joints.describe()} joint set is scored")
    vis = gt[..., 2] > 0
    vis[:, list(joints.unscored)] = False
    if joints.normaliser == "torso":
        norm = torso_lengths(gt[..., :2], vis, *joints.torso)
    else:  # box: the longer side of the person box
        norm = np.array([max(float(f.bbox[2]), float(f.bbox[3])) for f in frames])
    return gt[..., :2], vis, norm


def score(predictions: np.ndarray, frames: list, joints: JointSet) -> dict[str, float]:
    """The joint set's metrics (`joints.metric_keys`) of predictions in image coordinates against the labels."""
    if joints.normaliser == "macc":
        gt = np.stack([f.keypoints for f in frames])
        return {"macc": bbc_macc(predictions, gt[..., :2], gt[..., 2])["mean"]}
    gt, vis, norm = _scored(joints, frames)
    return {k: pck(predictions, gt, vis, alpha, norm)["mean"] for k, alpha in (("pck@0.2", 0.2), ("pck@0.5", 0.5))}


def per_frame_pck(predictions: np.ndarray, frames: list, joints: JointSet, alpha: float = 0.2) -> np.ndarray:
    """PCK of each frame on its own (NaN where no joint counts): for curves over a stream."""
    if joints.normaliser == "macc":
        raise ValueError(f"per-frame curves are PCK; the {joints.name} joint set is scored by mAcc")
    gt, vis, norm = _scored(joints, frames)
    hits, mask = pck_hits(predictions, gt, vis, alpha, norm)
    counted = mask.sum(1)
    return np.where(counted > 0, hits.sum(1) / np.maximum(counted, 1), np.nan)


def evaluate_person(model, recon_loss, cfg: Config, frames: list, scenario: str, seed: int = 0,
                    adapt_frames: list | None = None, on_frame=None) -> dict:
    """Score one person's labeled frames. `adapt_frames` (offline only) replaces the adaptation set."""
    device = next(model.parameters()).device  # the crops go where the model is
    crops, matrices, groups = prepare_frames(frames, cfg.model.image_size)
    crops = crops.to(device)
    augment = Augmentation.from_data(cfg.data)  # the pairs TTP draws are augmented as training's are
    result = {"frames": len(frames)}
    if scenario == "none":
        predictions = predict_crops(model, crops, matrices)
    elif scenario == "offline" and adapt_frames is not None:
        a_crops, a_matrices, a_groups = prepare_frames(adapt_frames, cfg.model.image_size)
        ttp = personalize(model, recon_loss, a_crops.to(device), a_matrices, a_groups, cfg.ttp, scenario, seed,
                          augment=augment)
        predictions = predict_crops(with_weights(model, ttp.state), crops, matrices)
        result["ttp"] = ttp.metrics
    else:
        ttp = personalize(model, recon_loss, crops, matrices, groups, cfg.ttp, scenario, seed, on_frame, augment)
        predictions = ttp.predictions
        result["ttp"] = ttp.metrics
    result.update(score(predictions, frames, joint_set(cfg.model.joint_set)))
    result["predictions"] = predictions
    return result


def summarize(rows: list[dict], metric_keys: list[str]) -> dict[str, float]:
    """Mean of each metric over persons (NaN-aware; NaN when there are none)."""
    return {k: float(np.nanmean([r[k] for r in rows])) if rows else float("nan") for k in metric_keys}
