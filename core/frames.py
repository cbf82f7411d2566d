"""A person's frames, wherever they live: Parquet shards (a URL), an image folder or a video file.

The edge CLI, the Flower client, evaluation and the experiments all read persons through here, so a
person's frames are the same frames whichever side reads them.
"""
from __future__ import annotations

import os

from data.shards import Frame, list_persons, load_frames, read_joint_set
from data.sources import load_folder, load_video
from model.joints import JointSet, JointSetMismatch, require_same

SOURCES = ("shards", "folder", "video")


class FramesUnavailable(ValueError):
    """A person's frames cannot be read from the source given; the message says why."""


def source_kind(path: str) -> str:
    """shards (a remote URL, or a directory with a shards manifest), folder (any other directory) or video."""
    if "://" in path and not path.startswith("file://"):
        return "shards"
    local = path[len("file://"):] if path.startswith("file://") else path
    if os.path.isfile(os.path.join(local, "manifest.json")):
        return "shards"
    if os.path.isdir(local):
        return "folder"
    if os.path.isfile(local):
        return "video"
    raise FramesUnavailable(f"{path!r} does not exist")


def load_person_frames(path: str, person_id: str, joints: JointSet, kind: str | None = None) -> list[Frame]:
    """The person's frames from `path` (`kind` one of SOURCES; None: told by `source_kind`) for a model predicting
    `joints`: shards of another joint set are refused."""
    if not path:
        raise FramesUnavailable("no frames source given")
    try:
        kind = kind or source_kind(path)
        if kind == "shards":
            require_same(joints, "the model", read_joint_set(path), f"shards {path}")
            frames = load_frames(path, person=person_id)
        elif kind == "folder":
            frames = load_folder(path, person_id, joints.size)
        elif kind == "video":
            frames = load_video(path, person_id, joints.size)
        else:
            raise FramesUnavailable(f"unknown frames source {kind!r}; one of {SOURCES}")
    except (FramesUnavailable, JointSetMismatch):
        raise
    except (OSError, ValueError) as exc:
        raise FramesUnavailable(f"cannot read {path!r}: {exc}") from exc
    if not frames:
        known = list_persons(path) if kind == "shards" else []
        hint = f"; it holds {len(known)} persons, e.g. {', '.join(known[:5])}" if known else ""
        raise FramesUnavailable(f"{path!r} holds no frames for person {person_id!r}{hint}")
    return frames


def labeled_person_frames(url: str, split: str, limit: int | None = None) -> dict[str, list[Frame]]:
    """{person id: labeled frames} of a split's first `limit` persons (all when None), persons without labels
    left out."""
    persons = list_persons(url, split)[:limit] if limit else list_persons(url, split)
    out = {}
    for pid in persons:
        frames = [f for f in load_frames(url, split=split, person=pid) if f.labeled]
        if frames:
            out[pid] = frames
    return out
