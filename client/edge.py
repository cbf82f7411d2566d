"""`posettp personalize`: TTP for one person on an edge machine, no Flower, no server.

The delta is written to a file (`--out`) or filed in a delta store (`--store`) under the store's delta
policy, the one the Flower server and every reader of the store apply.
"""
from __future__ import annotations

import logging

from core.frames import load_person_frames
from model import io
from model.checkpoint import load_checkpoint
from model.config import apply_overrides
from store.deltas import DeltaStore
from store.policy import DeltaPolicy, check_person_id

from .overlay import write_overlay
from .ttp_job import run_ttp

log = logging.getLogger(__name__)


def person_frames(args, num_joints: int) -> tuple[str, list]:
    """(person id, frames) from --shards + --person, --images or --video."""
    if args.shards:
        if not args.person:
            raise ValueError("--shards needs --person ID")
        return args.person, load_person_frames(args.shards, args.person, num_joints, "shards")
    person = args.person or "me"
    if args.images:
        return person, load_person_frames(args.images, person, num_joints, "folder")
    return person, load_person_frames(args.video, person, num_joints, "video")


def main(args) -> int:
    ck = load_checkpoint(args.checkpoint)
    cfg = apply_overrides(ck.config, args.overrides)
    person, frames = person_frames(args, cfg.model.num_joints)
    check_person_id(person)
    store = DeltaStore(args.store, DeltaPolicy.for_checkpoint(ck)) if args.store else None
    if store:
        io.ensure_writable(args.store)
    dtype = args.dtype or "int8"
    data, metrics, result = run_ttp(ck, frames, args.scenario, cfg.ttp, cfg.ttp.seed, person, dtype,
                                   args.device)
    if metrics["delta_tensors"] == 0:
        print(f"TTP kept the base weights for {person} ({metrics['guard_events']} safeguard events): no delta to file")
    elif store:
        record = store.file_delta(person, data)
        print(f"filed delta for {person}: version {record['version']} ({record['bytes']:,} bytes) in {args.store}")
    else:
        io.write_bytes_atomic(args.out, data)
        print(f"wrote delta {args.out} ({len(data):,} bytes)")
    if args.overlay:
        print(f"wrote overlay {write_overlay(frames, result.predictions, args.overlay)}")
    print(io.json_text({k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}, indent=None))
    return 0
