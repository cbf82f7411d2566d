"""A tiny PoseTrack 2018 dataset in the real on-disk layout, for the importer's tests and for training tests.

`{root}/annotations/{train,val}/{video}.json` (COCO-style, one file per video) and
`{root}/images/{train,val}/{video}/NNNNNN.jpg`. Default: train videos 000001_bonn_train (2 tracks; track 2 is
missing from the last labeled frame) and 000002_mpii_train (1 track), val video 000003_bonn (2 tracks); 6 frames
each, the even ones labeled (PoseTrack labels some frames of a video). Frame 0 of each video also carries a
head-box-only person (no keypoints, no bbox), as the real files do. Ears are unannotated (0, 0, 0) as in
PoseTrack, and the second track's left ankle is occluded.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

POSETRACK_NAMES = ("nose", "head_bottom", "head_top", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
                   "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
                   "right_knee", "left_ankle", "right_ankle")
VIDEOS = (("train", "000001_bonn_train", 2), ("train", "000002_mpii_train", 1), ("val", "000003_bonn", 2))
# joints as fractions (u, v) of the person box, in POSETRACK_NAMES order (the person faces the camera)
_POSE = np.array([[.5, .08], [.5, .18], [.5, .0], [0, 0], [0, 0], [.7, .25], [.3, .25], [.8, .42], [.2, .42],
                  [.85, .57], [.15, .57], [.62, .58], [.38, .58], [.64, .78], [.36, .78], [.65, .97], [.35, .97]])


def _box(track: int, frame: int) -> list[float]:
    """Person `track` walks right 1 px a frame; boxes sit side by side in a 96x80 frame."""
    return [6.0 + 44 * (track - 1) + frame, 6.0, 34.0, 68.0]


def write_posetrack(src: Path, videos=VIDEOS, frames: int = 6, names=POSETRACK_NAMES, size=(96, 80)) -> Path:
    """Write the dataset at `src` (the directory holding annotations/ and images/); returns `src`.

    `videos`: (split folder, video name, tracks); frame k is labeled when k is even; `names`: the person
    category's keypoint names (COCO's own give the COCO layout).
    """
    width, height = size
    for v, (part, video, tracks) in enumerate(videos, start=1):
        images, annotations = [], []
        for k in range(frames):
            name = f"images/{part}/{video}/{k:06d}.jpg"
            image_id = 10000000000 + v * 10000 + k
            labeled = k % 2 == 0
            images.append({"id": image_id, "frame_id": image_id, "vid_id": f"{v:06d}", "file_name": name,
                           "is_labeled": labeled, "nframes": frames, "has_no_densepose": True,
                           "ignore_regions_x": [], "ignore_regions_y": []})
            canvas = np.full((height, width, 3), (40 + 30 * v, 90, 140), np.uint8)
            cv2.line(canvas, (0, height - 8), (width - 1, height - 8), (200, 200, 200), 2)
            for t in range(1, tracks + 1):
                x, y, w, h = _box(t, k)
                cv2.rectangle(canvas, (int(x + w * .3), int(y + h * .2)), (int(x + w * .7), int(y + h * .6)),
                              (30, 60 * t, 220), -1)
                cv2.circle(canvas, (int(x + w / 2), int(y + h * .1)), 5, (180, 200, 240), -1)
                if not labeled or (v == 1 and t == 2 and k == frames - 2):
                    continue
                kp = np.concatenate([_POSE * [w, h] + [x, y], np.ones((17, 1))], axis=1)
                kp[3:5] = 0
                if t == 2:
                    kp[15] = 0
                annotations.append({"id": len(annotations), "image_id": image_id, "track_id": t,
                                    "keypoints": kp.round(2).reshape(-1).tolist(), "bbox": [x, y, w, h],
                                    "bbox_head": [x + w * .35, y, w * .3, h * .2], "category_id": 1, "scores": []})
            if k == 0:
                annotations.append({"id": len(annotations), "image_id": image_id, "track_id": 9,
                                    "bbox_head": [80.0, 2.0, 8.0, 10.0], "category_id": 1})
            path = src / name
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), canvas)
        ann = src / "annotations" / part
        ann.mkdir(parents=True, exist_ok=True)
        category = {"id": 1, "name": "person", "supercategory": "person", "keypoints": list(names),
                    "skeleton": [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8],
                                 [7, 9], [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7]]}
        (ann / f"{video}.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                      "categories": [category]}))
    return src
