"""Draw predicted joints on the original frames, at a size people can read, and write them as a video or PNGs.

Small frames (a 64-pixel synthetic person, a thumbnail) are upscaled so that the shorter side is READABLE pixels
before drawing; the bones are the joint set's, left limbs blue, right orange. With the base model's predictions
beside the personalized ones, each frame is a side-by-side: what personalization changed, frame by frame.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from model.joints import JointSet

LEFT_COLOR, RIGHT_COLOR, JOINT_COLOR = (60, 120, 255), (255, 140, 40), (255, 255, 255)
READABLE = 360  # the shorter side, in pixels, of every drawn frame


def draw_pose(image_rgb: np.ndarray, joints: np.ndarray, joint_set: JointSet, caption: str = "") -> np.ndarray:
    """The frame scaled to a readable size with bones (left blue, right orange), joints and an optional caption."""
    left = {i for i, name in enumerate(joint_set.joints) if name.startswith("left_")}
    right = {i for i, name in enumerate(joint_set.joints) if name.startswith("right_")}
    h, w = image_rgb.shape[:2]
    scale = max(1.0, READABLE / min(h, w))
    out = cv2.resize(image_rgb, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_CUBIC)
    thickness = max(2, round(min(out.shape[:2]) / 120))
    pts = [(int(round(x * scale)), int(round(y * scale))) for x, y in np.asarray(joints)[:, :2]]
    for a, b in joint_set.skeleton:
        color = LEFT_COLOR if {a, b} <= left else RIGHT_COLOR if {a, b} & right else JOINT_COLOR
        cv2.line(out, pts[a], pts[b], color, thickness, cv2.LINE_AA)
    for i, p in enumerate(pts):
        cv2.circle(out, p, thickness + 2, LEFT_COLOR if i in left else JOINT_COLOR, -1, cv2.LINE_AA)
    if caption:
        cv2.putText(out, caption, (8, 8 + 12 * thickness), cv2.FONT_HERSHEY_SIMPLEX, 0.3 * thickness,
                    (255, 255, 255), max(1, thickness // 2), cv2.LINE_AA)
    return out


def overlay_frames(frames: list, predictions: np.ndarray, joint_set: JointSet,
                   base_predictions: np.ndarray | None = None) -> list:
    """One drawn image per frame; side by side (base | personalized) when the base's predictions are given."""
    if base_predictions is None:
        return [draw_pose(f.image, p, joint_set) for f, p in zip(frames, predictions)]
    return [np.hstack([draw_pose(f.image, b, joint_set, "base"), draw_pose(f.image, p, joint_set, "personalized")])
            for f, p, b in zip(frames, predictions, base_predictions)]


def write_overlay(frames: list, predictions: np.ndarray, out: str, joint_set: JointSet,
                  base_predictions: np.ndarray | None = None, fps: float = 15.0) -> str:
    """Write `out` as an .mp4/.avi video, or as a folder of PNGs for any other name."""
    images = overlay_frames(frames, predictions, joint_set, base_predictions)
    path = Path(out)
    if path.suffix.lower() in (".mp4", ".avi"):
        h, w = images[0].shape[:2]
        fourcc = cv2.VideoWriter_fourcc(*("mp4v" if path.suffix.lower() == ".mp4" else "MJPG"))
        writer = cv2.VideoWriter(str(path), fourcc, fps, (w, h))
        if not writer.isOpened():
            raise ValueError(f"{out}: OpenCV cannot write this video format here")
        for img in images:
            writer.write(cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        writer.release()
    else:
        path.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            cv2.imwrite(str(path / f"{i:06d}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return str(path)
