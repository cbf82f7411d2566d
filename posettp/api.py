"""The Python API: load a checkpoint, predict poses, personalize on a person's frames, apply a delta.

A thin layer over what the CLI, Flower and Serve already run, so a notebook gets the same crops, the same TTP
(`client.ttp_job.run_ttp`, the one place a delta is made) and the same delta policy as the store:

    model = posettp.load("runs/demo")                  # a checkpoint directory or a run with latest.json
    poses = model.predict(["frame.jpg"])               # [[{"name", "x", "y", "score"} x J]] in image pixels
    delta = model.personalize(frames, scenario="offline", steps=30)
    me = model.with_delta(delta)                       # validated like a stored delta
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import numpy as np
import torch

from client.ttp_job import kept_base_reason, run_ttp
from core.checkpoints import with_weights
from core.crops import prepare_crop
from data.shards import Frame
from data.sources import read_image, unlabeled_frame
from model import io
from model.checkpoint import Checkpoint, load_checkpoint
from model.config import apply_overrides
from model.delta import apply_delta
from model.device import pick_device
from model.predict import predict_crops
from model.transforms import full_image_bbox, keypoints_json
from store.policy import DeltaPolicy


def load(checkpoint: str | os.PathLike, device: str = "auto") -> "PoseEstimator":
    """The model of a checkpoint directory (or of a training run directory, through its `latest.json`);
    `device`: "auto" (CUDA when there is a GPU), "cpu", "cuda" or "cuda:N"."""
    # the checkpoint stays on the CPU: run_ttp and the delta policy use it there; predictions run on `device`
    return PoseEstimator(load_checkpoint(os.fspath(checkpoint)), pick_device(device))


@dataclass(frozen=True)
class Delta:
    """What `PoseEstimator.personalize` made: the delta's safetensors bytes (relative to the base checkpoint) and what
    TTP did. `reason` says why the base weights were kept (no delta: nothing to save or apply), else ""."""

    data: bytes
    scenario: str
    frames: int
    steps: int
    guard_events: int  # safeguard events: a rollback by the guard, or a too weak pose signal
    loss_before: float
    loss_after: float
    reason: str
    metrics: dict  # all of run_ttp's metrics (seconds, device, peak memory, ...)

    @property
    def size_bytes(self) -> int:
        return len(self.data)

    @property
    def kept_base(self) -> bool:
        return bool(self.reason)

    def save(self, path: str | os.PathLike) -> str:
        """Write the delta's bytes (atomically; a local path or a URL); returns the path."""
        if self.kept_base:
            raise ValueError(f"no delta to save: {self.reason}")
        io.write_bytes_atomic(os.fspath(path), self.data)
        return os.fspath(path)


class PoseEstimator:
    """A base checkpoint's model, or that model with one person's delta applied (`with_delta`)."""

    def __init__(self, ck: Checkpoint, device: torch.device, delta: dict[str, torch.Tensor] | None = None,
                 delta_meta: dict | None = None):
        self.checkpoint = ck
        self.device = device
        self.delta_meta = delta_meta  # the applied delta's metadata; None for the base model
        self.joint_names = ck.joint_set.joints
        self.net = with_weights(ck.model, apply_delta(ck.model.state_dict(), delta or {})).to(device)

    def predict(self, images: list, boxes: list | None = None) -> list[list[dict]]:
        """Per image, its J keypoints `{"name", "x", "y", "score"}` in the image's pixels (as the HTTP API
        answers). `images`: HxWx3 uint8 RGB arrays or image file paths; `boxes`: one (x, y, w, h) person box
        (or None) per image, None = the whole image."""
        images = [as_image(im) for im in images]
        boxes = [None] * len(images) if boxes is None else list(boxes)
        if len(boxes) != len(images):
            raise ValueError(f"{len(boxes)} boxes for {len(images)} images")
        if not images:
            return []
        size = self.checkpoint.config.model.image_size
        crops, matrices = zip(*(prepare_crop(im, full_image_bbox(im.shape[1], im.shape[0]) if box is None else box,
                                             size) for im, box in zip(images, boxes)))
        pred = predict_crops(self.net, torch.from_numpy(np.stack(crops)), np.stack(matrices))
        return [keypoints_json(p, self.joint_names) for p in pred]

    def personalize(self, frames: list, scenario: str = "offline", *, person_id: str = "me", dtype: str = "int8",
                    **ttp) -> Delta:
        """TTP on one person's frames (images as for `predict`, whole-image boxes, one video; or `data.shards`
        Frame objects) from the base checkpoint. `ttp`: TTP settings over the checkpoint's (`ttp.*` of the
        config, e.g. steps=30, batch_size=4, seed=1; `python -m posettp.settings_doc` lists them)."""
        cfg = apply_overrides(copy.deepcopy(self.checkpoint.config), [f"ttp.{k}={v}" for k, v in ttp.items()])
        frames = [f if isinstance(f, Frame) else unlabeled_frame(as_image(f), person_id, "images", i,
                                                                 cfg.model.num_joints) for i, f in enumerate(frames)]
        data, m, _ = run_ttp(self.checkpoint, frames, scenario, cfg.ttp, cfg.ttp.seed, person_id, dtype,
                             str(self.device))
        return Delta(data, scenario, m["frames"], m["steps"], m["guard_events"], m["loss_before"], m["loss_after"],
                     kept_base_reason(m), m)

    def with_delta(self, delta: Delta | bytes | str | os.PathLike) -> "PoseEstimator":
        """A new model: the base checkpoint plus `delta` (a Delta, its bytes, or a file path / URL), checked by the
        delta policy every store reader applies (`DeltaRejected` with the reason when it fails)."""
        if isinstance(delta, Delta):
            delta = delta.data
        elif not isinstance(delta, bytes):
            delta = io.read_bytes(os.fspath(delta))
        tensors, meta = DeltaPolicy.for_checkpoint(self.checkpoint).check(delta)
        return PoseEstimator(self.checkpoint, self.device, tensors, meta)


def as_image(image) -> np.ndarray:
    """An HxWx3 uint8 RGB array as is; a path read like an image folder's frames."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(os.fspath(image))
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"an image must be an HxWx3 uint8 RGB array, got {image.dtype} {image.shape}")
    return image
