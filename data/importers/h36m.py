"""Human3.6M -> shards, from the public COCO-style layout of the 3DMPPE / I2L-MeshNet releases (mks0601).

Layout under `{src}`:
- `annotations/Human36M_subject{S}_data.json`: COCO `images` (id, file_name, width, height, subject,
  action_idx, subaction_idx, cam_idx, frame_idx) and `annotations` (image_id, bbox as x, y, w, h);
- `annotations/Human36M_subject{S}_camera.json`: {cam_idx: {R: 3x3, t: 3, f: 2, c: 2}};
- `annotations/Human36M_subject{S}_joint_3d.json`: {action_idx: {subaction_idx: {frame_idx: 17 x [x, y, z]}}}
  in world millimetres;
- `images/{file_name}`.
2-D joints are the 3-D joints projected by the camera (x_cam = R X + t, u = f x / z + c); the 17
Human3.6M joints are kept (visible = inside the image). person_id = "S{subject}"; a video is one
(action, subaction, camera) sequence; every FRAME_STRIDE-th frame is taken (the usual training
subsampling). Train S1, S5, S6, S7, S8; test S9, S11.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from model.joints import H36M

from .common import read_jpeg, read_json

NAME = "h36m"
JOINTS = H36M.joints
FLIP_PAIRS = H36M.flip_pairs
SPLITS = {1: "train", 5: "train", 6: "train", 7: "train", 8: "train", 9: "test", 11: "test"}
FRAME_STRIDE = 5


def rows(src: Path) -> Iterator[dict]:
    ann = src / "annotations"
    subjects = sorted(s for s in SPLITS if (ann / f"Human36M_subject{s}_data.json").is_file())
    if not subjects:
        raise FileNotFoundError(f"{ann}: no Human36M_subject{{S}}_data.json for any of S{list(SPLITS)}")
    for s in subjects:
        yield from _subject(src, s)


def _subject(src: Path, subject: int) -> Iterator[dict]:
    ann = src / "annotations"
    data_path = ann / f"Human36M_subject{subject}_data.json"
    data = read_json(data_path)
    cameras = read_json(ann / f"Human36M_subject{subject}_camera.json")
    joints_path = ann / f"Human36M_subject{subject}_joint_3d.json"
    joints = read_json(joints_path)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ValueError(f"{data_path}: expected COCO keys 'images' and 'annotations'")
    boxes = {a["image_id"]: a["bbox"] for a in data["annotations"]}
    images = sorted(data["images"], key=lambda im: (im["action_idx"], im["subaction_idx"], im["cam_idx"],
                                                     im["frame_idx"]))
    for im in images:
        if im["frame_idx"] % FRAME_STRIDE:
            continue
        where = f"subject {subject} action {im['action_idx']} subaction {im['subaction_idx']} frame {im['frame_idx']}"
        try:
            world = np.asarray(joints[str(im["action_idx"])][str(im["subaction_idx"])][str(im["frame_idx"])],
                               np.float64)
            cam = cameras[str(im["cam_idx"])]
        except KeyError as exc:
            raise ValueError(f"{joints_path}: no joints or camera {exc} for {where}") from exc
        if world.shape != (len(JOINTS), 3):
            raise ValueError(f"{joints_path}: {where} has joints of shape {world.shape}, expected "
                             f"({len(JOINTS)}, 3): Human3.6M has {len(JOINTS)} joints")
        if im["id"] not in boxes:
            raise ValueError(f"{data_path}: image {im['id']} ({im['file_name']}) has no annotation with a bbox")
        image, width, height = read_jpeg(src / "images" / im["file_name"])
        xc = np.asarray(cam["R"], np.float64) @ world.T + np.asarray(cam["t"], np.float64).reshape(3, 1)
        xy = (xc[:2] / xc[2:3]).T * np.asarray(cam["f"], np.float64) + np.asarray(cam["c"], np.float64)
        vis = (xy[:, 0] >= 0) & (xy[:, 0] <= width - 1) & (xy[:, 1] >= 0) & (xy[:, 1] <= height - 1)
        yield {"person_id": f"S{subject}", "video_id": Path(im["file_name"]).parent.name or im["file_name"],
               "frame": int(im["frame_idx"]), "image": image, "width": width, "height": height,
               "keypoints": np.concatenate([xy, vis[:, None]], axis=1).reshape(-1),
               "bbox": np.asarray(boxes[im["id"]], np.float32), "split": SPLITS[subject]}
