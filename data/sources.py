"""A person's frames from wherever they live on the edge: shards, an image folder or a video file.

Folder and video frames carry no labels (visibility 0) and, lacking a detector,
the whole image as the person box.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from model.transforms import full_image_bbox

from .shards import Frame

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}


def read_image(path) -> np.ndarray:
    """An image file as HxWx3 uint8 RGB."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"{path}: not a readable image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def unlabeled_frame(image_rgb: np.ndarray, person_id: str, video_id: str, index: int, num_joints: int):
    """A frame without labels, the whole image as the person's box (what a device has of its user)."""
    h, w = image_rgb.shape[:2]
    return Frame(person_id=person_id, video_id=video_id, frame=index, image=image_rgb,
                 keypoints=np.zeros((num_joints, 3), np.float32),
                 bbox=np.asarray(full_image_bbox(w, h), np.float32), split="edge")


def load_folder(path: str, person_id: str = "me", num_joints: int = 13) -> list:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {path}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    frames = []
    for i, f in enumerate(files):
        frames.append(unlabeled_frame(read_image(f), person_id, folder.name, i, num_joints))
    return frames


def load_video(path: str, person_id: str = "me", num_joints: int = 13, max_frames: int = 2000) -> list:
    if not Path(path).is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    cap = cv2.VideoCapture(str(path))
    frames = []
    try:
        while len(frames) < max_frames:
            ok, bgr = cap.read()
            if not ok:
                break
            frames.append(unlabeled_frame(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), person_id, Path(path).stem,
                                          len(frames), num_joints))
    finally:
        cap.release()
    if not frames:
        raise ValueError(f"{path}: no decodable video frames")
    return frames
