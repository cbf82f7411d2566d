"""PoseTrack 2018 -> shards: people in the wild, on video, each person a track.

Layout under `{src}` (or `{src}/posetrack_data`, as the archive unpacks): `annotations/{train,val}/{video}.json`,
one COCO-style file per video with `images` (id, file_name relative to that root, is_labeled), `annotations`
(image_id, track_id, keypoints 17 x [x, y, v], bbox x, y, w, h) and `categories` (the person's keypoint names);
frames at `images/{train,val}/{video}/NNNNNN.jpg`.

A person is one track of one video (PoseTrack's track ids are per video): person_id = "{video}-t{track_id}",
video_id = video, frame = the image's position in its video in file-name order (frame_id is a global id). Split:
annotations/train -> "train", annotations/val -> "test" (PoseTrack's test labels are not public, so its val set
is the usual test set; as with the other importers there is no "val" split).

The 17 COCO slots are kept. The official files name slots 1 and 2 head_bottom and head_top, not COCO's eyes; then
those two slots are emptied (0, 0, not visible) so they neither train nor score as eyes and their flip pair swaps
nothing. v > 0 is visible. Annotations without keypoints or bbox (PoseTrack's head-box-only people) are skipped.

TTP adapts on a person's unlabeled video, so each frame with is_labeled false becomes, for every track labeled in
that video and labeled both before and after it, an unlabeled row (all keypoints zero, as the shards mark extra
frames) with the bbox of that track's nearest labeled frame. Frames outside a track's labeled span are left out:
there the person may have moved far from any known box, or left the picture.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from model.joints import COCO, COCO_JOINTS

from .common import read_jpeg, read_json

NAME = "posetrack"
JOINTS = COCO_JOINTS
FLIP_PAIRS = COCO.flip_pairs
POSETRACK_JOINTS = ("nose", "head_bottom", "head_top") + COCO_JOINTS[3:]
SPLITS = {"train": "train", "val": "test"}


def rows(src: Path) -> Iterator[dict]:
    root = src / "posetrack_data" if not (src / "annotations").exists() and (src / "posetrack_data").is_dir() else src
    files = [(split, f) for part, split in SPLITS.items() for f in sorted((root / "annotations" / part).glob("*.json"))]
    if not files:
        raise FileNotFoundError(f"{root / 'annotations'}: no PoseTrack annotation files (train/*.json, val/*.json)")
    for split, path in files:
        yield from _video(root, path, split)


def _head_slots(path: Path, categories) -> bool:
    """Whether the file names PoseTrack's head_bottom/head_top in COCO's eye slots; any other layout is refused."""
    names = next((tuple(c.get("keypoints", ())) for c in categories if c.get("name") == "person"), None)
    if names is None:
        raise ValueError(f"{path}: no 'person' category with keypoint names")
    if len(names) != len(JOINTS):
        raise ValueError(f"{path}: the person category names {len(names)} keypoints, expected {len(JOINTS)}")
    if names not in (JOINTS, POSETRACK_JOINTS):
        raise ValueError(f"{path}: person keypoints {list(names)} are neither COCO's nor PoseTrack 2018's")
    return names == POSETRACK_JOINTS


def _video(root: Path, path: Path, split: str) -> Iterator[dict]:
    d = read_json(path)
    if not isinstance(d, dict) or any(k not in d for k in ("images", "annotations", "categories")):
        raise ValueError(f"{path}: expected COCO keys 'images', 'annotations' and 'categories'")
    heads = _head_slots(path, d["categories"])
    if any(not {"id", "file_name", "is_labeled"} <= im.keys() for im in d["images"]):
        raise ValueError(f"{path}: every image needs id, file_name and is_labeled")
    images = sorted(d["images"], key=lambda im: im["file_name"])
    ids = {im["id"] for im in images}
    index = {im["id"]: i for i, im in enumerate(images) if im["is_labeled"]}
    labeled: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}  # (frame, track) -> keypoints, bbox
    for a in d["annotations"]:
        if not a.get("keypoints") or not a.get("bbox"):
            continue  # a head-box-only person: no pose to learn from or box to crop
        where = f"annotation {a.get('id')} (image {a.get('image_id')}, track {a.get('track_id')})"
        if "track_id" not in a or a.get("image_id") not in ids:
            raise ValueError(f"{path}: {where} needs a track_id and the id of an image in the file")
        if a["image_id"] not in index:
            continue  # a frame not marked labeled stays unlabeled
        kp = np.asarray(a["keypoints"], np.float32)
        if kp.shape != (len(JOINTS) * 3,):
            raise ValueError(f"{path}: {where} has {kp.size} keypoint values, expected {len(JOINTS)} joints x 3")
        if len(a["bbox"]) != 4:
            raise ValueError(f"{path}: {where} has bbox {a['bbox']}, expected x, y, w, h")
        kp = kp.reshape(-1, 3)
        kp[:, 2] = kp[:, 2] > 0
        if heads:
            kp[1:3] = 0
        key = (index[a["image_id"]], a["track_id"])
        if key in labeled:
            raise ValueError(f"{path}: {where}: the image has two annotations of this track")
        labeled[key] = kp, np.asarray(a["bbox"], np.float32)
    seen = {t: sorted(f for f, tt in labeled if tt == t) for t in sorted({t for _, t in labeled})}
    video = path.stem
    for i, im in enumerate(images):
        if im["is_labeled"]:
            people = [(t, *labeled[i, t]) for t in seen if (i, t) in labeled]
        else:
            people = [(t, np.zeros((len(JOINTS), 3), np.float32),
                       labeled[min(fs, key=lambda f: (abs(f - i), f)), t][1]) for t, fs in seen.items()
                      if fs[0] < i < fs[-1]]
        if not people:
            continue
        image, width, height = read_jpeg(root / im["file_name"])
        for t, kp, box in people:
            yield {"person_id": f"{video}-t{t}", "video_id": video, "frame": i, "image": image, "width": width,
                   "height": height, "keypoints": kp.reshape(-1), "bbox": box, "split": split}
