"""The random scale, rotation and flip of a training or TTP pair: one set of parameters, read from `data.*`."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import DataConfig

SCALE_RANGE = (0.75, 1.25)  # the paper's clip of the scale draw
MAX_ROTATION = 60.0  # degrees, the paper's clip of the rotation draw


@dataclass(frozen=True)
class Augmentation:
    """Scale ~ N(1, scale_std) clipped to SCALE_RANGE; with probability rot_prob a rotation ~ N(0, rot_std) degrees
    clipped to +-MAX_ROTATION; a mirror with probability flip_prob.

    Joint training (`data.pairs.PairDataset`) and TTP (`model.personalize.shared_augment`) both draw from one of
    these, made by `from_data(cfg.data)`, so a `data.*` setting changes both alike. The defaults are DataConfig's.
    TTP never mirrors: its pairs get the rotation and scale only, as in the paper.
    """

    scale_std: float = DataConfig.scale_std
    rot_std: float = DataConfig.rot_std
    rot_prob: float = DataConfig.rot_prob
    flip_prob: float = DataConfig.flip_prob

    @classmethod
    def from_data(cls, data: DataConfig) -> Augmentation:
        return cls(data.scale_std, data.rot_std, data.rot_prob, data.flip_prob)

    def draw(self, rng: np.random.Generator) -> tuple[float, float, bool]:
        """One pair's (scale, rotation degrees, flip) from numpy: a data-loader item draws from its own generator."""
        scale = float(np.clip(rng.normal(1.0, self.scale_std), *SCALE_RANGE))
        rotate = rng.random() < self.rot_prob
        rot = float(np.clip(rng.normal(0.0, self.rot_std), -MAX_ROTATION, MAX_ROTATION)) if rotate else 0.0
        return scale, rot, bool(rng.random() < self.flip_prob)

    def draw_batch(self, b: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, rotation degrees) of `b` pairs from a torch generator, no flip: TTP augments whole batches."""
        scale = (1 + torch.randn(b, generator=gen) * self.scale_std).clamp(*SCALE_RANGE)
        rot = (torch.randn(b, generator=gen) * self.rot_std).clamp(-MAX_ROTATION, MAX_ROTATION)
        rot = torch.where(torch.rand(b, generator=gen) < self.rot_prob, rot, torch.zeros_like(rot))
        return scale, rot
