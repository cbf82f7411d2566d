"""Tiny datasets in each dataset's own on-disk format (Penn Action, BBC Pose, Human3.6M), for the importer tests and
the tests that train and evaluate each dataset's config. PoseTrack's is in tests/fixtures_posetrack.py."""
import json
from pathlib import Path

import cv2
import numpy as np
import scipy.io


def write_jpeg(path, w=48, h=40, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    cv2.imwrite(str(path), img)


def write_penn(src, videos=(("0001", 1, 3), ("0002", -1, 2)), joints=13, drop_field=None):
    for vid, train, n in videos:
        x = np.tile(np.arange(1, joints + 1, dtype=float), (n, 1)) + np.arange(n)[:, None]
        y = np.full((n, joints), 10.0)
        vis = np.ones((n, joints))
        vis[:, 0] = 0
        d = {"x": x, "y": y, "visibility": vis, "bbox": np.tile([2.0, 3.0, 30.0, 35.0], (n, 1)),
             "train": np.array([[train]]), "action": "tennis_serve", "pose": "back", "nframes": np.array([[n]]),
             "dimensions": np.array([[40, 48, n]])}
        d.pop(drop_field, None)
        (src / "labels").mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(src / "labels" / f"{vid}.mat", d)
        for i in range(n):
            write_jpeg(src / "frames" / vid / f"{i + 1:06d}.jpg", seed=i)


def write_bbc(src: Path) -> Path:
    """bbcpose.mat with one train video (2 frames) and one test video (2 frames), 7 joints."""
    fields = ["videoName", "type", "source", "train_frames", "train_joints", "test_frames", "test_joints"]
    arr = np.zeros((1, 12), dtype=[(f, object) for f in fields])
    for i in range(12):
        for f in fields:
            arr[0, i][f] = np.zeros((0, 0))
        arr[0, i]["videoName"] = f"video{i + 1}"
    joints = np.stack([np.tile(np.linspace(5, 40, 7), (2, 1))] * 2, axis=2)  # (2, 7, 2)
    arr[0, 0]["type"], arr[0, 0]["train_frames"], arr[0, 0]["train_joints"] = "train", np.array([[101, 205]]), joints
    arr[0, 10]["type"], arr[0, 10]["test_frames"], arr[0, 10]["test_joints"] = "test", np.array([[7, 9]]), joints
    src.mkdir()
    scipy.io.savemat(src / "bbcpose.mat", {"bbcpose": arr})
    for video, frames in (("1", (101, 205)), ("11", (7, 9))):
        for fr in frames:
            write_jpeg(src / video / f"{fr}.jpg", w=72, h=48)
    return src


def write_h36m(src, joints=17):
    ann = src / "annotations"
    ann.mkdir(parents=True)
    cam = {"R": np.eye(3).tolist(), "t": [0, 0, 5000], "f": [1000, 1000], "c": [32, 24]}
    world = np.stack([np.linspace(-140, 140, joints), np.linspace(-100, 100, joints), np.zeros(joints)], 1)
    world[0] = [5000, 0, 0]  # projects outside the image -> not visible
    for subject in (1, 9):
        images, annots = [], []
        for k, frame in enumerate((0, 3, 5)):  # frame 3 is skipped by the stride of 5
            name = f"s_{subject:02d}_act_02_subact_01_ca_01/s_{subject:02d}_act_02_subact_01_ca_01_{frame + 1:06d}.jpg"
            images.append({"id": k, "file_name": name, "width": 64, "height": 48, "subject": subject,
                           "action_idx": 2, "subaction_idx": 1, "cam_idx": 1, "frame_idx": frame})
            annots.append({"id": k, "image_id": k, "bbox": [10, 4, 40, 40], "keypoints_vis": [True] * 17})
            write_jpeg(src / "images" / name, w=64, h=48)
        (ann / f"Human36M_subject{subject}_data.json").write_text(json.dumps({"images": images,
                                                                             "annotations": annots}))
        (ann / f"Human36M_subject{subject}_camera.json").write_text(json.dumps({"1": cam}))
        jw = {"2": {"1": {str(fr): world.tolist() for fr in (0, 3, 5)}}}
        (ann / f"Human36M_subject{subject}_joint_3d.json").write_text(json.dumps(jw))
