"""Crop preparation for inference and TTP: one image and box in, the model's input and its affine out.

Training, TTP, evaluation, the demo and serving all crop through here (and so through `model.transforms`),
so a crop made for one is the crop the others make.
"""
from __future__ import annotations

import numpy as np
import torch

from data.shards import Frame
from model.transforms import crop_matrix, to_tensor_layout, warp


def prepare_crop(image_rgb: np.ndarray, bbox, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(3, S, S) float32 crop in [0, 1] of an HxWx3 uint8 RGB image by `bbox` (x, y, w, h), and its 2x3 affine."""
    m = crop_matrix(bbox, size)
    return to_tensor_layout(warp(image_rgb, m, size)), m


def prepare_frame(frame: Frame, image_size: int) -> tuple[torch.Tensor, np.ndarray]:
    """A frame cropped by its own box, no augmentation: (3, S, S) tensor and the 2x3 crop affine."""
    crop, m = prepare_crop(frame.image, frame.bbox, image_size)
    return torch.from_numpy(crop), m


def prepare_frames(frames: list[Frame], image_size: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Crops (N, 3, S, S), affines (N, 2, 3) and video group ids (N,) in the form `model.personalize` takes."""
    if not frames:
        return torch.zeros(0, 3, image_size, image_size), np.zeros((0, 2, 3)), np.zeros(0, np.int64)
    crops, mats = zip(*(prepare_frame(f, image_size) for f in frames))
    videos: dict[tuple[str, str], int] = {}
    groups = np.array([videos.setdefault((f.person_id, f.video_id), len(videos)) for f in frames], np.int64)
    return torch.stack(crops), np.stack(mats), groups
