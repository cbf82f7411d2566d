"""Per-worker data for joint training: a rank's slice of the train split and a step-addressed batch stream.

Sharding is by person (each Ray Train worker reads only the persons
`persons[rank::world]` from the Parquet shards), so a source frame is always
drawn from the target's own video on the same worker. With fewer persons than
workers it falls back to videos, then frames. The batch at step `s` of a rank
is a pure function of (seed, rank, s): a resumed run draws the very batches
the uninterrupted run would have drawn, with no sampler state to save.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from data.pairs import PairDataset
from data.shards import list_persons, load_frames
from model.config import Config


def labeled(frames: list) -> list:
    """Frames with at least one visible joint (extra unlabeled TTP frames are skipped)."""
    return [f for f in frames if f.keypoints[:, 2].any()]


def derive_seed(*parts) -> int:
    """A stable 63-bit seed from any tuple of ints/strings (independent of PYTHONHASHSEED)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & ((1 << 63) - 1)


def load_worker_frames(url: str, split: str, rank: int, world: int) -> tuple[list, dict]:
    """The labeled frames of this rank's slice of `split`, and a description of the slice."""
    persons = list_persons(url, split)
    if not persons:
        raise ValueError(f"{url}: no persons in split {split!r}")
    if len(persons) >= world:
        mine = persons[rank::world]
        frames = labeled([f for p in mine for f in load_frames(url, split=split, person=p)])
        info = {"by": "person", "persons": len(mine), "of_persons": len(persons)}
    else:
        everything = labeled(load_frames(url, split=split))
        videos = sorted({(f.person_id, f.video_id) for f in everything})
        if len(videos) >= world:
            keep = set(videos[rank::world])
            frames = [f for f in everything if (f.person_id, f.video_id) in keep]
            info = {"by": "video", "videos": len(keep), "of_videos": len(videos)}
        else:
            frames = everything[rank::world]
            info = {"by": "frame"}
    if not frames:
        raise ValueError(f"{url}: rank {rank} of {world} got no labeled frames in split {split!r}")
    info["frames"] = len(frames)
    return frames, info


def validation_frames(url: str, split: str, cap: int) -> list:
    """Up to `cap` labeled frames of `split`, taken round-robin over persons so every person counts."""
    if cap <= 0:
        return []
    per_person = [labeled(load_frames(url, split=split, person=p)) for p in list_persons(url, split)]
    per_person = [fs for fs in per_person if fs]
    out, i = [], 0
    while len(out) < cap and any(i < len(fs) for fs in per_person):
        out.extend(fs[i] for fs in per_person if i < len(fs))
        i += 1
    return out[:cap]


class StepBatchSampler(Sampler):
    """Batches of (epoch, index) keys for steps start_step, start_step+1, ...

    The stream is the concatenation of permutations perm(seed, rank, epoch) of
    range(n), cut into batches of `batch_size`; it never ends (the step count
    ends training), and it works for any n >= 1, even n < batch_size. The
    epoch travels with each index so that the dataset draws that epoch's
    augmentation.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, start_step: int = 0):
        if n < 1:
            raise ValueError("no frames to sample from")
        self.n, self.batch_size, self.seed, self.rank, self.start_step = n, batch_size, seed, rank, start_step

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng(derive_seed("perm", self.seed, self.rank, epoch)).permutation(self.n)

    def __iter__(self):
        pos = self.start_step * self.batch_size
        epoch, offset = divmod(pos, self.n)
        perm = self._perm(epoch)
        while True:
            batch = []
            while len(batch) < self.batch_size:
                take = perm[offset:offset + self.batch_size - len(batch)]
                batch.extend((epoch, int(i)) for i in take)
                offset += len(take)
                if offset >= self.n:
                    epoch, offset = epoch + 1, 0
                    perm = self._perm(epoch)
            yield batch


class EpochPairs(Dataset):
    """PairDataset addressed by (epoch, index): its augmentation is a function of (seed, epoch, index)."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key):
        epoch, i = key
        self.pairs.set_epoch(epoch)
        return self.pairs[i]


def batch_stream(frames: list, cfg: Config, rank: int = 0, start_step: int = 0, pin_memory: bool = False):
    """An endless iterator of training batches (dicts of tensors) for steps start_step, start_step+1, ...

    The one batch stream of every trainer (Ray workers, `train_local`, the Ray-overhead bench). Nothing here
    touches the global RNGs (the loader has its own generator), so the batches of a step depend only on
    (cfg.train.seed, rank, step).
    """
    pairs = PairDataset(frames, cfg.model.image_size, cfg.data, seed=derive_seed("aug", cfg.train.seed, rank) % 2 ** 31,
                        augment=True)
    sampler = StepBatchSampler(len(pairs), cfg.train.batch_size, cfg.train.seed, rank, start_step)
    loader = DataLoader(EpochPairs(pairs), batch_sampler=sampler, num_workers=cfg.data.num_workers,
                        pin_memory=pin_memory, persistent_workers=cfg.data.num_workers > 0,
                        generator=torch.Generator().manual_seed(derive_seed("loader", cfg.train.seed, rank) % 2 ** 63))
    return iter(loader)

