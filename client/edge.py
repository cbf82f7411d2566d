"""`posettp personalize`: TTP for one person on an edge machine, no Flower, no server.

The delta is written to a file (`--out`) or filed in a delta store (`--store`) under the store's delta
policy, the one the Flower server and every reader of the store apply.
"""
from __future__ import annotations

from tqdm import tqdm

from core.crops import prepare_frames
from core.frames import load_person_frames
from model import io
from model.checkpoint import load_checkpoint
from model.config import apply_overrides
from model.joints import JointSet
from model.predict import predict_crops
from store.deltas import DeltaStore
from store.policy import DeltaPolicy, check_person_id

from .overlay import write_overlay
from .ttp_job import kept_base_reason, run_ttp


def person_frames(args, joints: JointSet) -> tuple[str, list]:
    """(person id, frames) from --shards + --person, --images or --video."""
    if args.shards:
        if not args.person:
            raise ValueError("--shards needs --person ID")
        return args.person, load_person_frames(args.shards, args.person, joints, "shards")
    person = args.person or "me"
    if args.images:
        return person, load_person_frames(args.images, person, joints, "folder")
    return person, load_person_frames(args.video, person, joints, "video")


KEPT_BASE = 3  # exit status when a safeguard kept the base weights (no delta written or filed)


def main(args) -> int:
    """Exit 0 with a delta written or filed, KEPT_BASE when a safeguard kept the base weights (each safeguard and
    its measured reason printed, and in the --json summary); bad input is refused before any work (exit 2)."""
    ck = load_checkpoint(args.checkpoint)
    cfg = apply_overrides(ck.config, args.overrides)
    person, frames = person_frames(args, ck.joint_set)
    check_person_id(person)
    store = DeltaStore(args.store, DeltaPolicy.for_checkpoint(ck)) if args.store else None
    if store:
        io.ensure_writable(args.store)
    unit = "step" if args.scenario == "offline" else "frame"
    with tqdm(total=cfg.ttp.steps if args.scenario == "offline" else len(frames), unit=unit,
              desc=f"personalize {person} ({args.scenario})", disable=None) as bar:
        def progress(done: int, total: int, loss: float) -> None:
            bar.update(done - bar.n)
            bar.set_postfix(loss=f"{loss:.4g}", refresh=False)

        data, metrics, result = run_ttp(ck, frames, args.scenario, cfg.ttp, cfg.ttp.seed, person, args.dtype,
                                       args.device, on_progress=progress)
    summary = {"person_id": person, "scenario": args.scenario, "outcome": "delta", **metrics}
    print(f"{person}: {metrics['frames']} frames, {metrics['steps']} updates in {metrics['ttp_seconds']:.1f} s "
          f"({metrics['frames'] / max(metrics['ttp_seconds'], 1e-9):.1f} frames/s), self-supervised loss "
          f"{metrics['loss_before']:.4g} -> {metrics['loss_after']:.4g}")
    for event in metrics["safeguards"]:
        print(f"  {event['safeguard']} after {event['after_updates']} updates: {event['reason']} "
              f"(kept {event['kept']})")
    if metrics["delta_tensors"] == 0:
        summary["outcome"] = "kept_base"
        summary["reason"] = kept_base_reason(metrics)
        print(f"TTP kept the base weights for {person}: no delta written")
    elif store:
        record = store.file_delta(person, data)
        summary["delta"] = {"store": args.store, "version": record["version"], "bytes": record["bytes"]}
        print(f"filed delta for {person}: version {record['version']} ({record['bytes']:,} bytes) in {args.store}")
    else:
        io.write_bytes_atomic(args.out, data)
        summary["delta"] = {"path": args.out, "bytes": len(data)}
        print(f"wrote delta {args.out} ({len(data):,} bytes)")
    if args.overlay:
        crops, matrices, _ = prepare_frames(frames, cfg.model.image_size)
        base = predict_crops(ck.model, crops, matrices)
        written = write_overlay(frames, result.predictions, args.overlay, ck.joint_set, base)
        print(f"wrote overlay, base | personalized: {written}")
    if args.json_out:
        io.write_bytes_atomic(args.json_out, io.json_text(summary).encode())
    return KEPT_BASE if summary["outcome"] == "kept_base" else 0
