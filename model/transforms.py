"""Crop geometry shared by training, TTP, evaluation and serving.

Every caller maps images and joints through the same affine crop so that a
prediction made anywhere lands back in original image coordinates the same way.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

BOX_PADDING = 1.25  # the square crop is 1.25 x the longer side of the person box

def crop_matrix(bbox, size: int, scale: float = 1.0, rot_deg: float = 0.0, flip: bool = False) -> np.ndarray:
    """2x3 affine from original pixels to a `size`x`size` crop around `bbox` (x, y, w, h).

    `scale` > 1 zooms out, `rot_deg` rotates the person counter-clockwise, `flip`
    mirrors horizontally (the caller swaps left/right joints).
    """
    x, y, w, h = (float(v) for v in bbox)
    side = max(w, h, 1.0) * BOX_PADDING * scale
    cx, cy = x + w / 2.0, y + h / 2.0
    s = size / side
    a = math.radians(rot_deg)
    cos, sin = math.cos(a) * s, math.sin(a) * s
    # rotate+scale about the box centre, then move the centre to the crop centre
    m = np.array([[cos, sin, 0.0], [-sin, cos, 0.0]], dtype=np.float64)
    m[:, 2] = np.array([size / 2.0, size / 2.0]) - m[:, :2] @ np.array([cx, cy])
    if flip:
        m[0] = -m[0]
        m[0, 2] += size - 1
    return m


def invert(m: np.ndarray) -> np.ndarray:
    return cv2.invertAffineTransform(np.asarray(m, dtype=np.float64))


def apply_affine(points: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Map (..., 2) points through a 2x3 affine."""
    pts = np.asarray(points, dtype=np.float64)
    return pts @ np.asarray(m)[:, :2].T + np.asarray(m)[:, 2]


def warp(image: np.ndarray, m: np.ndarray, size: int) -> np.ndarray:
    return cv2.warpAffine(image, np.asarray(m, dtype=np.float64), (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


def to_tensor_layout(image_rgb_u8: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB -> 3xHxW float32 in [0, 1] (the network's input convention)."""
    return np.ascontiguousarray(image_rgb_u8.transpose(2, 0, 1), dtype=np.float32) / 255.0


def keypoints_json(pred: np.ndarray, names) -> list[dict]:
    """(J, 3) [x, y, score] as `[{"name", "x", "y", "score"}, ...]`."""
    return [{"name": n, "x": float(x), "y": float(y), "score": float(s)} for n, (x, y, s) in zip(names, pred)]


def full_image_bbox(width: int, height: int) -> tuple[float, float, float, float]:
    """Box used when no person box is known: the whole image, undoing the padding."""
    side = max(width, height) / BOX_PADDING
    return ((width - side) / 2.0, (height - side) / 2.0, side, side)
