"""BBC Pose -> shards.

Layout: `{src}/bbcpose.mat` holding `bbcpose`, a 1x20 struct array (one entry per video) with
videoName, type, source, train_frames, train_joints (2 x 7 x n), test_frames, test_joints, and the
frames at `{src}/{video}/{frame}.jpg` where video = entry index + 1. Videos 1-10 are train (their
train_frames/train_joints), videos 11-20 test (test_frames/test_joints, the manual ground truth).
One signer per video: person_id = video_id = the video number. BBC Pose has no boxes: the box is
the joints +- 60 px clipped to the image, as in the paper's released code. 1-based pixels -> 0-based.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from model.joints import BBC

from .common import box_from_joints, load_mat, read_jpeg

NAME = "bbc"
JOINTS = BBC.joints
FLIP_PAIRS = BBC.flip_pairs
FIELDS = ("videoName", "type", "train_frames", "train_joints", "test_frames", "test_joints")
TRAIN_VIDEOS, TEST_VIDEOS = range(1, 11), range(11, 21)
BOX_MARGIN = 60.0


def rows(src: Path) -> Iterator[dict]:
    mat = src / "bbcpose.mat"
    entries = load_mat(mat, FIELDS, key="bbcpose")["bbcpose"].reshape(-1)
    for index, entry in enumerate(entries):
        video = index + 1
        if video in TRAIN_VIDEOS:
            split, frames, joints = "train", entry["train_frames"], entry["train_joints"]
        elif video in TEST_VIDEOS:
            split, frames, joints = "test", entry["test_frames"], entry["test_joints"]
        else:  # the extended BBC Pose entries beyond 20 are not part of BBC Pose
            break
        frames = np.asarray(frames, np.float64).reshape(-1).astype(np.int64)
        joints = np.asarray(joints, np.float64)
        if frames.size == 0:
            continue
        if joints.ndim != 3 or joints.shape[:2] != (2, len(JOINTS)) or joints.shape[2] != frames.size:
            raise ValueError(f"{mat}: video {video} {split}_joints has shape {joints.shape}, expected "
                             f"(2, {len(JOINTS)}, {frames.size}): BBC Pose has {len(JOINTS)} joints per frame")
        for i, frame in enumerate(frames):
            data, width, height = read_jpeg(src / str(video) / f"{frame}.jpg")
            xy = joints[:, :, i].T - 1
            kp = np.concatenate([xy, np.ones((len(JOINTS), 1))], axis=1)
            yield {"person_id": str(video), "video_id": str(video), "frame": int(frame), "image": data,
                   "width": width, "height": height, "keypoints": kp.reshape(-1),
                   "bbox": box_from_joints(xy, kp[:, 2], BOX_MARGIN, width, height), "split": split}
