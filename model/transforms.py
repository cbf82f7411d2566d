"""Crop geometry shared by training, TTP, evaluation and serving.

Every caller maps images and joints through the same affine crop so that a
prediction made anywhere lands back in original image coordinates the same way.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

BOX_PADDING = 1.25  # the square crop is 1.25 x the longer side of the person box

# Penn Action order: head, l/r shoulder, l/r elbow, l/r wrist, l/r hip, l/r knee, l/r ankle
PENN_JOINTS = (
    "head", "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist",
    "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
)
PENN_FLIP_PAIRS = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12))
BBC_FLIP_PAIRS = ((1, 2), (3, 4), (5, 6))  # head, r/l wrist, r/l elbow, r/l shoulder
# pelvis, r hip/knee/ankle, l hip/knee/ankle, torso, neck, nose, head, l shoulder/elbow/wrist, r shoulder/elbow/wrist
H36M_FLIP_PAIRS = ((1, 4), (2, 5), (3, 6), (11, 14), (12, 15), (13, 16))
# each supported joint set has its own size, so a model's or a frame's joint count names its left/right pairs
FLIP_PAIRS_BY_JOINT_COUNT = {13: PENN_FLIP_PAIRS, 7: BBC_FLIP_PAIRS, 17: H36M_FLIP_PAIRS}


def flip_pairs_for(num_joints: int) -> tuple:
    """The left/right pairs of the joint set with `num_joints` joints (Penn Action and the synthetic persons 13,
    BBC Pose 7, Human3.6M 17), which a mirrored image swaps."""
    if num_joints not in FLIP_PAIRS_BY_JOINT_COUNT:
        raise ValueError(f"no left/right joint pairs known for {num_joints} joints; "
                         f"known joint sets: {sorted(FLIP_PAIRS_BY_JOINT_COUNT)}")
    return FLIP_PAIRS_BY_JOINT_COUNT[num_joints]


def flip_permutation(num_joints: int, pairs=None) -> np.ndarray:
    """Joint order after a horizontal mirror: left and right swapped (`pairs` defaults to the joint set's)."""
    pairs = flip_pairs_for(num_joints) if pairs is None else pairs
    perm = np.arange(num_joints)
    for a, b in pairs:
        perm[a], perm[b] = b, a
    return perm


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


def joint_names(num_joints: int) -> tuple[str, ...]:
    """The names keypoints are reported under (HTTP API, Python API): Penn Action's 13, else joint_0.."""
    return PENN_JOINTS if num_joints == len(PENN_JOINTS) else tuple(f"joint_{i}" for i in range(num_joints))


def keypoints_json(pred: np.ndarray, names) -> list[dict]:
    """(J, 3) [x, y, score] as `[{"name", "x", "y", "score"}, ...]`."""
    return [{"name": n, "x": float(x), "y": float(y), "score": float(s)} for n, (x, y, s) in zip(names, pred)]


def full_image_bbox(width: int, height: int) -> tuple[float, float, float, float]:
    """Box used when no person box is known: the whole image, undoing the padding."""
    side = max(width, height) / BOX_PADDING
    return ((width - side) / 2.0, (height - side) / 2.0, side, side)
