"""`posettp personalize`: TTP for one person on an edge machine, no Flower, no server.

The delta is written to a file (`--out`) or filed in a delta store (`--store`)
with the same validation the Flower server applies.
"""
from __future__ import annotations

import json
import logging

from model import io
from model.checkpoint import load_checkpoint
from model.config import apply_overrides

log = logging.getLogger(__name__)


def load_person_frames(args, num_joints: int) -> tuple[str, list]:
    from data.sources import load_folder, load_video

    if args.shards:
        if not args.person:
            raise ValueError("--shards needs --person ID")
        from data.shards import load_frames

        frames = load_frames(args.shards, person=args.person)
        if not frames:
            raise ValueError(f"{args.shards}: no frames for person {args.person!r}")
        return args.person, frames
    person = args.person or "me"
    if args.images:
        return person, load_folder(args.images, person, num_joints)
    return person, load_video(args.video, person, num_joints)


def main(args) -> int:
    from client.ttp_job import run_ttp
    from server.registry import BaseModelInfo, DeltaStore, check_person_id

    ck = load_checkpoint(args.checkpoint)
    cfg = apply_overrides(ck.config, args.overrides)
    person, frames = load_person_frames(args, cfg.model.num_joints)
    check_person_id(person)
    store = DeltaStore(args.store) if args.store else None
    if store:
        io.ensure_writable(args.store)
    dtype = args.dtype or "int8"
    data, metrics, result = run_ttp(ck, frames, args.scenario, cfg.ttp, cfg.ttp.seed, person, dtype,
                                   args.device)
    if metrics["delta_tensors"] == 0:
        print(f"TTP kept the base weights for {person} ({metrics['guard_events']} safeguard events): no delta to file")
    elif store:
        record = store.file_delta(person, data, BaseModelInfo.from_model(ck.model, ck.sha256))
        print(f"filed delta for {person}: version {record['version']} ({record['bytes']:,} bytes) in {args.store}")
    else:
        io.write_bytes_atomic(args.out, data)
        print(f"wrote delta {args.out} ({len(data):,} bytes)")
    if args.overlay:
        from client.overlay import write_overlay

        print(f"wrote overlay {write_overlay(frames, result.predictions, args.overlay)}")
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}))
    return 0
