"""`posettp evaluate`: per-person and mean PCK (or BBC mAcc) without TTP, with online/offline TTP,
or with each person's latest stored delta.

The per-person numbers are what every experiment is built from, so they are
computed here once: reproduce, the demo and the Flower checks all call
`evaluate_person`.
"""
from __future__ import annotations

import json
import logging

import numpy as np
import torch
from tqdm import tqdm

from model.checkpoint import Checkpoint, load_checkpoint, restore_loss_buffers
from model.config import Config, apply_overrides
from model.delta import DeltaRejected, apply_delta
from model.device import pick_device
from model.metrics import bbc_macc, pck, pck_hits
from model.personalize import personalize
from model.predict import predict_crops

from .loop import build_recon_loss

log = logging.getLogger(__name__)


def score(predictions: np.ndarray, frames: list, dataset: str) -> dict[str, float]:
    gt = np.stack([f.keypoints for f in frames])
    if dataset == "bbc":
        return {"macc": bbc_macc(predictions, gt[..., :2], gt[..., 2])["mean"]}
    return {"pck@0.2": pck(predictions, gt[..., :2], gt[..., 2], 0.2)["mean"],
            "pck@0.5": pck(predictions, gt[..., :2], gt[..., 2], 0.5)["mean"]}


def per_frame_pck(predictions: np.ndarray, frames: list, alpha: float = 0.2) -> np.ndarray:
    """PCK of each frame on its own (NaN where no joint counts): for curves over a stream."""
    gt = np.stack([f.keypoints for f in frames])
    hits, mask = pck_hits(predictions, gt[..., :2], gt[..., 2], alpha)
    counted = mask.sum(1)
    return np.where(counted > 0, hits.sum(1) / np.maximum(counted, 1), np.nan)


def model_with_loss(ck: Checkpoint, device: torch.device | None = None):
    """The checkpoint's model in eval mode and its reconstruction loss with the trained running means, both moved
    to `device` when given (the checkpoint's model is that same module)."""
    recon = build_recon_loss(ck.model, ck.config)
    if recon is not None:
        restore_loss_buffers(recon, ck.loss_buffers)
        recon.eval()
    if device is not None:
        ck.model.to(device)
        recon = recon.to(device) if recon is not None else None
    return ck.model.eval(), recon


def evaluate_person(model, recon_loss, cfg: Config, frames: list, scenario: str, seed: int = 0,
                    adapt_frames: list | None = None, on_frame=None) -> dict:
    """Score one person's labeled frames. `adapt_frames` (offline only) replaces the adaptation set."""
    from data.pairs import prepare_frames

    device = next(model.parameters()).device  # the crops go where the model is
    crops, matrices, groups = prepare_frames(frames, cfg.model.image_size)
    crops = crops.to(device)
    result = {"frames": len(frames)}
    if scenario == "none":
        predictions = predict_crops(model, crops, matrices)
    elif scenario == "offline" and adapt_frames is not None:
        a_crops, a_matrices, a_groups = prepare_frames(adapt_frames, cfg.model.image_size)
        ttp = personalize(model, recon_loss, a_crops.to(device), a_matrices, a_groups, cfg.ttp, scenario, seed)
        tuned = type(model)(model.cfg).to(device)
        tuned.load_state_dict(ttp.state)
        predictions = predict_crops(tuned, crops, matrices)
        result["ttp"] = ttp.metrics
    else:
        ttp = personalize(model, recon_loss, crops, matrices, groups, cfg.ttp, scenario, seed, on_frame)
        predictions = ttp.predictions
        result["ttp"] = ttp.metrics
    result.update(score(predictions, frames, cfg.data.dataset))
    result["predictions"] = predictions
    return result


def labeled_person_frames(url: str, split: str, limit: int | None = None) -> dict[str, list]:
    from data.shards import list_persons, load_frames

    persons = list_persons(url, split)[:limit] if limit else list_persons(url, split)
    out = {}
    for pid in persons:
        frames = [f for f in load_frames(url, split=split, person=pid) if f.keypoints[:, 2].any()]
        if frames:
            out[pid] = frames
    return out


def summarize(rows: list[dict], metric_keys: list[str]) -> dict[str, float]:
    return {k: float(np.nanmean([r[k] for r in rows])) if rows else float("nan") for k in metric_keys}


def main(args) -> int:
    from data.shards import read_manifest

    from server.registry import BaseModelInfo, DeltaStore

    ck = load_checkpoint(args.checkpoint)
    cfg = apply_overrides(ck.config, args.overrides)
    manifest = read_manifest(args.data)
    cfg.data.dataset = manifest.get("dataset", cfg.data.dataset)
    device = pick_device(args.device)
    model, recon = model_with_loss(ck, device)
    if args.store and args.scenario != "none":
        raise ValueError("--store applies stored deltas: use it with --scenario none")
    store = DeltaStore(args.store) if args.store else None
    base_info = BaseModelInfo.from_model(model, ck.sha256) if store else None
    persons = labeled_person_frames(args.data, args.split, args.persons)
    if not persons:
        raise ValueError(f"{args.data}: no labeled persons in split {args.split!r}")
    rows = []
    for pid, frames in tqdm(persons.items(), desc=f"evaluate {args.scenario}", mininterval=5):
        person_model, version = model, None
        if store:
            try:
                found = store.load_latest(pid, base_info)
            except DeltaRejected as exc:
                log.warning("person %s: stored delta refused (%s); scoring the base model", pid, exc)
                found = None
            if found:
                delta, _, record = found
                person_model = type(model)(model.cfg).to(device)
                person_model.load_state_dict(apply_delta(model.state_dict(), delta))
                person_model.eval()
                version = record["version"]
        res = evaluate_person(person_model, recon, cfg, frames, args.scenario, seed=cfg.ttp.seed)
        res.pop("predictions")
        rows.append({"person_id": pid, **res, **({"model_version": version or "base"} if store else {})})
    keys = ["macc"] if cfg.data.dataset == "bbc" else ["pck@0.2", "pck@0.5"]
    report = {"metric": "macc" if cfg.data.dataset == "bbc" else "pck@0.2", "mean": summarize(rows, keys),
              "persons": rows, "scenario": args.scenario, "checkpoint_sha256": ck.sha256,
              "split": args.split, "data": args.data, "device": str(device)}
    for r in rows:
        print(f"{r['person_id']:>16s}  " + "  ".join(f"{k} {r[k]:.3f}" for k in keys))
    print(f"{'mean':>16s}  " + "  ".join(f"{k} {report['mean'][k]:.3f}" for k in keys)
          + f"   ({len(rows)} persons, scenario {args.scenario})")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=2, default=float)
    return 0
