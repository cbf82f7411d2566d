"""Torch-side views of decoded frames: training pairs and per-person TTP streams/sets.

All geometry goes through `model/transforms.py`, the geometry inference,
TTP and serving crop with (`core.crops`).
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from torch.utils.data import Dataset

from model.augment import Augmentation
from model.config import DataConfig
from model.joints import dataset_joint_set
from model.transforms import apply_affine, crop_matrix, to_tensor_layout, warp

from .shards import Frame


def _one_person(frames: list[Frame]) -> None:
    ids = {f.person_id for f in frames}
    if len(ids) > 1:
        raise ValueError(f"expected the frames of one person, got {len(ids)}: {sorted(ids)[:5]}")


def person_stream(frames: list[Frame]) -> list[Frame]:
    """Online TTP order: one person's labeled frames, video by video, each video in frame order."""
    _one_person(frames)
    return sorted((f for f in frames if f.labeled), key=lambda f: (f.video_id, f.frame))


def person_set(frames: list[Frame], unlabeled: bool = True) -> list[Frame]:
    """Offline TTP pool: the labeled frames (in stream order, so predictions line up with labels first),
    then, if `unlabeled`, the person's extra unlabeled frames."""
    stream = person_stream(frames)
    if not unlabeled:
        return stream
    return stream + sorted((f for f in frames if not f.labeled), key=lambda f: (f.video_id, f.frame))


class PairDataset(Dataset):
    """Training pairs: target = frame i, source = another frame of the same video, both cropped by the
    target's box under one shared random scale/rotation/flip (`model.augment`, which TTP draws from too).
    With probability `data.cross_video` the source comes from another video of the person instead, cropped
    by its own box (its camera differs, so the target's box would miss the person).

    The augmentation of item i is drawn from (seed, epoch, i), so it is reproducible and
    independent of DataLoader workers; call `set_epoch` to draw new ones each epoch.
    """

    def __init__(self, frames: list[Frame], image_size: int, data_cfg: DataConfig, seed: int = 0,
                 augment: bool = True):
        if not frames:
            raise ValueError("PairDataset needs at least one frame")
        self.frames, self.size, self.cfg, self.seed, self.augment = frames, image_size, data_cfg, seed, augment
        self.aug = Augmentation.from_data(data_cfg)
        self.epoch = 0
        joints = dataset_joint_set(data_cfg.dataset)
        if frames[0].keypoints.shape[0] != joints.size:
            raise ValueError(f"frames have {frames[0].keypoints.shape[0]} joints, data.dataset {data_cfg.dataset} "
                             f"has the {joints.describe()} joint set")
        self.perm = joints.flip_permutation()  # the joint set's own left/right pairs
        by_video: dict[tuple[str, str], list[int]] = defaultdict(list)
        by_person: dict[str, list[int]] = defaultdict(list)
        for i, f in enumerate(frames):
            by_video[(f.person_id, f.video_id)].append(i)
            by_person[f.person_id].append(i)
        self.video_of = [by_video[(f.person_id, f.video_id)] for f in frames]
        self.person_of = [by_person[f.person_id] for f in frames]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, i])
        target = self.frames[i]
        others = [j for j in self.video_of[i] if j != i]
        cross = self.cfg.cross_video > 0 and rng.random() < self.cfg.cross_video
        if cross:  # another video of the person, where there is one
            others = [j for j in self.person_of[i] if self.frames[j].video_id != target.video_id] or others
        source = self.frames[others[rng.integers(len(others))]] if others else target
        scale, rot, flip = self.aug.draw(rng) if self.augment else (1.0, 0.0, False)
        m = crop_matrix(target.bbox, self.size, scale, rot, flip)
        # a source from another video (another camera) is cropped by its own box, as TTP crops every frame
        m_source = crop_matrix(source.bbox, self.size, scale, rot, flip) if source.video_id != target.video_id else m
        joints = apply_affine(target.keypoints[:, :2], m)
        visible = target.keypoints[:, 2] > 0
        if flip:
            joints, visible = joints[self.perm], visible[self.perm]
        inside = (joints >= 0).all(axis=1) & (joints <= self.size - 1).all(axis=1)
        return {
            "target": torch.from_numpy(to_tensor_layout(warp(target.image, m, self.size))),
            "source": torch.from_numpy(to_tensor_layout(warp(source.image, m_source, self.size))),
            "joints": torch.from_numpy(joints.astype(np.float32)),
            "visible": torch.from_numpy((visible & inside).astype(np.float32)),
            "matrix": torch.from_numpy(m.astype(np.float32)),
        }
