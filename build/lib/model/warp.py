"""Move the source frame's pixels the way its self-supervised keypoints moved to reach the target's.

Why: on a static scene the target differs from the source only where the body moved, so a renderer
that may copy the source reproduces the target without reading the target's keypoints (measured: swapping
them changed the reconstruction error by < 0.5 %), and TTP then follows a gradient with no pose in it.
Warping the source by the keypoint displacements makes the reconstruction of the moved body depend on where
the target's keypoints are: a keypoint off the limb drags the wrong pixels.

The motion field is a Gaussian-weighted mean of the keypoint displacements around the target's keypoints,
fading to zero (the static scene) away from every keypoint. Each Gaussian is an outer product of an x and
a y profile, so the field is built from the 1-D profiles without any K x H x W tensor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .heatmaps import gaussian_profiles

# weight of "no motion" at a pixel, against a keypoint Gaussian's peak of 1: a pixel on a keypoint follows it
# by 1 / (1 + 0.3) of its displacement, one far from every keypoint stays where it is
STATIC_WEIGHT = 0.3


def keypoint_warp(source: torch.Tensor, kp_source: torch.Tensor, kp_target: torch.Tensor, sigma: float) -> torch.Tensor:
    """Backward-warp `source` (B, C, S, S) by the motion kp_source -> kp_target ((B, K, 2), image pixels).

    Output pixel q samples the source at q - d(q), d(q) = sum_k g_k(q) (kp_target_k - kp_source_k) /
    (sum_k g_k(q) + STATIC_WEIGHT), g_k a Gaussian of `sigma` pixels at kp_target_k.
    """
    size = source.shape[-1]
    gx, gy = gaussian_profiles(kp_target, size, sigma)  # (B, K, S) each
    motion = kp_target - kp_source
    # one contraction gives the summed weights and the weighted x and y displacements
    sums = torch.einsum("bky,bkx,bkc->bcyx", gy, gx, torch.cat([torch.ones_like(motion[..., :1]), motion], -1))
    dx, dy = (sums[:, 1:] / (sums[:, :1] + STATIC_WEIGHT)).unbind(1)
    grid = torch.arange(size, dtype=source.dtype, device=source.device)
    # pixel centre u -> normalised (2u + 1) / S - 1 (align_corners=False)
    sample_x = (2 * (grid[None, None, :] - dx) + 1) / size - 1
    sample_y = (2 * (grid[None, :, None] - dy) + 1) / size - 1
    return F.grid_sample(source, torch.stack([sample_x, sample_y], dim=-1), align_corners=False,
                         padding_mode="border")
