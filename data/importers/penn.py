"""Penn Action -> shards.

Layout: `{src}/frames/NNNN/NNNNNN.jpg` (frames numbered from 1) and `{src}/labels/NNNN.mat` with
x, y (nframes x 13, MATLAB 1-based pixels), visibility (nframes x 13), bbox (nframes x 4 as x1, y1,
x2, y2), train (1 = train, -1 = test), action and nframes. Penn Action has no person ids: each video
is its own person (person_id = video_id = "NNNN"). Coordinates become 0-based pixels.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from model.joints import PENN

from .common import box_from_joints, load_mat, read_jpeg, scalar

NAME = "penn"
JOINTS = PENN.joints
FLIP_PAIRS = PENN.flip_pairs
FIELDS = ("x", "y", "visibility", "bbox", "train", "action", "nframes")


def rows(src: Path) -> Iterator[dict]:
    labels = sorted((src / "labels").glob("*.mat"))
    if not labels:
        raise FileNotFoundError(f"{src / 'labels'}: no Penn Action label files (NNNN.mat)")
    for mat in labels:
        yield from _video(src, mat)


def _video(src: Path, mat: Path) -> Iterator[dict]:
    d = load_mat(mat, FIELDS)
    vid = mat.stem
    n = int(scalar(d["nframes"], mat, "nframes"))
    arrays = {k: np.asarray(d[k], np.float64) for k in ("x", "y", "visibility")}
    for name, a in arrays.items():
        if a.ndim != 2 or a.shape[1] != len(JOINTS):
            raise ValueError(f"{mat}: {name} has shape {a.shape}, expected (nframes, {len(JOINTS)}): "
                             f"Penn Action has {len(JOINTS)} joints")
        if a.shape[0] != n:
            raise ValueError(f"{mat}: {name} has {a.shape[0]} rows but nframes is {n}")
    bbox = np.asarray(d["bbox"], np.float64)
    if bbox.ndim != 2 or bbox.shape[1] != 4 or bbox.shape[0] > n:
        raise ValueError(f"{mat}: bbox has shape {bbox.shape}, expected (nframes, 4) as x1, y1, x2, y2")
    train = scalar(d["train"], mat, "train")
    if train not in (1, -1):
        raise ValueError(f"{mat}: train is {train}, expected 1 (train) or -1 (test)")
    for i in range(n):
        data, width, height = read_jpeg(src / "frames" / vid / f"{i + 1:06d}.jpg")
        kp = np.stack([arrays["x"][i] - 1, arrays["y"][i] - 1, (arrays["visibility"][i] > 0)], axis=1)
        if i < len(bbox):
            x1, y1, x2, y2 = bbox[i] - 1
            box = np.array([x1, y1, x2 - x1, y2 - y1], np.float32)
        else:  # a few Penn Action videos have fewer box rows than frames: fall back to the joints' box
            box = box_from_joints(kp[:, :2], kp[:, 2], 10.0, width, height)
        yield {"person_id": vid, "video_id": vid, "frame": i + 1, "image": data, "width": width, "height": height,
               "keypoints": kp.reshape(-1), "bbox": box, "split": "train" if train == 1 else "test"}
