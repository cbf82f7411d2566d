"""Shared pieces of the dataset importers: reads that fail with the file's name and what is wrong, and boxes."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import scipy.io


def read_jpeg(path: Path) -> tuple[bytes, int, int]:
    """The file's JPEG bytes (stored as they are) and its width and height, after checking it decodes."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: frame image is missing")
    data = path.read_bytes()
    if data[:2] != b"\xff\xd8" or b"\xff\xd9" not in data[-64:]:
        raise ValueError(f"{path}: not a complete JPEG (corrupt or truncated)")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{path}: JPEG cannot be decoded")
    return data, image.shape[1], image.shape[0]


def load_mat(path: Path, fields: tuple[str, ...], key: str | None = None) -> dict:
    """Variables of a .mat file (or the fields of struct variable `key`), checking `fields` are present."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: annotation file is missing")
    try:
        data = scipy.io.loadmat(path)
    except Exception as exc:  # scipy raises several types for a damaged file
        raise ValueError(f"{path}: not a readable .mat file ({exc})") from exc
    if key is not None:
        if key not in data:
            raise ValueError(f"{path}: no variable {key!r} (found {sorted(k for k in data if not k.startswith('__'))})")
        names = data[key].dtype.names or ()
        missing = [f for f in fields if f not in names]
    else:
        missing = [f for f in fields if f not in data]
    if missing:
        raise ValueError(f"{path}: missing field(s) {missing}; expected {list(fields)}")
    return data


def scalar(value, path: Path, name: str) -> float:
    a = np.asarray(value).reshape(-1)
    if a.size != 1:
        raise ValueError(f"{path}: field {name!r} should hold one number, has shape {np.shape(value)}")
    return float(a[0])


def box_from_joints(xy: np.ndarray, visible: np.ndarray, margin: float, width: int, height: int) -> np.ndarray:
    """(x, y, w, h) around the visible joints (all joints if none is visible), `margin` px each side, in the image."""
    pts = xy[visible > 0] if (visible > 0).any() else xy
    lo = np.clip(pts.min(axis=0) - margin, 0, [width - 1, height - 1])
    hi = np.clip(pts.max(axis=0) + margin, 0, [width - 1, height - 1])
    return np.array([lo[0], lo[1], max(hi[0] - lo[0], 1.0), max(hi[1] - lo[1], 1.0)], np.float32)


def read_json(path: Path):
    """A JSON annotation file; a missing or malformed one is an error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: annotation file is missing")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
