"""Draw predicted joints on frames and write them as a video (or a folder of PNGs)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

# Penn Action skeleton: head-shoulders, arms, torso, legs
BONES = ((0, 1), (0, 2), (1, 3), (3, 5), (2, 4), (4, 6), (1, 2), (1, 7), (2, 8), (7, 8),
         (7, 9), (9, 11), (8, 10), (10, 12))
LEFT = {1, 3, 5, 7, 9, 11}


def draw_pose(image_rgb: np.ndarray, joints: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Copy of the image with bones (left blue, right orange) and joint dots."""
    out = image_rgb.copy()
    pts = [(int(round(x)), int(round(y))) for x, y in np.asarray(joints)[:, :2]]
    for a, b in BONES:
        if a < len(pts) and b < len(pts):
            color = (60, 120, 255) if a in LEFT and b in LEFT else (255, 140, 40)
            cv2.line(out, pts[a], pts[b], color, thickness, cv2.LINE_AA)
    for p in pts:
        cv2.circle(out, p, max(1, thickness + 1), (255, 255, 255), -1, cv2.LINE_AA)
    return out


def write_overlay(frames: list, predictions: np.ndarray, out: str, fps: float = 15.0) -> str:
    """Write `out` as an .mp4/.avi video, or as a folder of PNGs for any other name."""
    images = [draw_pose(f.image, p, max(1, f.image.shape[0] // 160)) for f, p in zip(frames, predictions)]
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
