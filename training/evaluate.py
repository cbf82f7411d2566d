"""`posettp evaluate`: per-person and mean PCK (or BBC mAcc) without TTP, with online/offline TTP,
or with each person's latest stored delta.
"""
from __future__ import annotations

import logging

from tqdm import tqdm

from core.checkpoints import model_with_loss, with_weights
from core.frames import labeled_person_frames
from core.scoring import evaluate_person, summarize
from data.shards import read_joint_set
from model import io
from model.checkpoint import load_checkpoint
from model.config import apply_overrides
from model.delta import DeltaRejected, apply_delta
from model.joints import require_same
from model.device import pick_device
from store.deltas import DeltaStore
from store.policy import DeltaPolicy

log = logging.getLogger(__name__)


def main(args) -> int:
    ck = load_checkpoint(args.checkpoint)
    cfg = apply_overrides(ck.config, args.overrides)
    joints = ck.joint_set
    require_same(joints, f"checkpoint {args.checkpoint}", read_joint_set(args.data), f"data {args.data}")
    device = pick_device(args.device)
    if args.store and args.scenario != "none":
        raise ValueError("--store applies stored deltas: use it with --scenario none")
    store = DeltaStore(args.store, DeltaPolicy.for_checkpoint(ck)) if args.store else None
    model, recon = model_with_loss(ck, device)
    persons = labeled_person_frames(args.data, args.split, args.persons)
    if not persons:
        raise ValueError(f"{args.data}: no labeled persons in split {args.split!r}")
    rows = []
    for pid, frames in tqdm(persons.items(), desc=f"evaluate {args.scenario}", mininterval=5):
        person_model, version = model, None
        if store:
            try:
                found = store.load_latest(pid)
            except DeltaRejected as exc:
                log.warning("person %s: stored delta refused (%s); scoring the base model", pid, exc)
                found = None
            if found:
                delta, _, record = found
                person_model = with_weights(model, apply_delta(model.state_dict(), delta))
                version = record["version"]
        res = evaluate_person(person_model, recon, cfg, frames, args.scenario, seed=cfg.ttp.seed)
        res.pop("predictions")
        rows.append({"person_id": pid, **res, **({"model_version": version or "base"} if store else {})})
    keys = joints.metric_keys
    report = {"metric": joints.headline, "joint_set": joints.name, "mean": summarize(rows, keys),
              "persons": rows, "scenario": args.scenario, "checkpoint_sha256": ck.sha256,
              "split": args.split, "data": args.data, "device": str(device)}
    for r in rows:
        print(f"{r['person_id']:>16s}  " + "  ".join(f"{k} {r[k]:.3f}" for k in keys))
    print(f"{'mean':>16s}  " + "  ".join(f"{k} {report['mean'][k]:.3f}" for k in keys)
          + f"   ({len(rows)} persons, scenario {args.scenario})")
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(io.json_text(report))
    return 0
