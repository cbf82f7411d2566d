"""`posettp import {penn,bbc,h36m,posetrack}`: convert a real dataset from its own on-disk layout to shards.

Each importer keeps its dataset's joint set (named in the manifest with its left/right flip pairs)
and its own train/test split. Bad input stops the import with an error naming the file and what is
wrong; since the manifest is written last and partial parts are removed, no half dataset is left
looking complete.
"""
from __future__ import annotations

from pathlib import Path

from model.joints import dataset_joint_set

from ..shards import write_shards
from . import bbc, h36m, penn, posetrack

IMPORTERS = {m.NAME: m for m in (penn, bbc, h36m, posetrack)}


def convert(dataset: str, src: str | Path, out: str) -> dict:
    """Convert `src` (a local directory in the dataset's own layout) to shards at `out`; returns the manifest."""
    if dataset not in IMPORTERS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(IMPORTERS)}")
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: source directory does not exist")
    module = IMPORTERS[dataset]
    manifest = {"dataset": dataset, "joints": list(module.JOINTS), "flip_pairs": [list(p) for p in module.FLIP_PAIRS],
                "joint_set": dataset_joint_set(dataset).to_dict(), "source": str(src)}
    return write_shards(module.rows(src), out, manifest)


def main(args) -> int:
    manifest = convert(args.dataset, args.src, args.out)
    counts = ", ".join(f"{s}: {c['persons']} persons / {c['frames']} frames" for s, c in manifest["splits"].items())
    print(f"imported {args.dataset}: {manifest['rows']} frames to {args.out} ({counts})")
    return 0
