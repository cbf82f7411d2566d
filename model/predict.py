"""Inference: crop -> network -> decode -> original image coordinates, in one place for every caller."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .heatmaps import DECODERS, heatmap_to_image
from .network import PoseTTPNet
from .joints import joint_set
from .transforms import apply_affine, invert


def mirrored_heatmaps(model: PoseTTPNet, images: torch.Tensor, perm) -> torch.Tensor:
    """Supervised heatmaps of the mirrored `images`, mirrored back with left and right swapped (`perm`): the
    heatmaps' pixel-centre grid mirrors exactly onto itself, so they line up with those of `images`."""
    return model.pose(images.flip(-1))["h_sup"].flip(-1)[:, perm]


# (scale, degrees) of the views a teacher's pseudo-label averages, each with its mirror: CoTTA's augmentation mean,
# at the scales and rotations joint training draws from
TEACHER_VIEWS = ((1.0, 0.0), (0.9, 0.0), (1.1, 0.0), (1.0, 15.0), (1.0, -15.0))


def _similarity(scale: float, degrees: float, batch: int, like: torch.Tensor) -> torch.Tensor:
    a = math.radians(degrees)
    theta = torch.tensor([[math.cos(a) * scale, -math.sin(a) * scale, 0.0],
                          [math.sin(a) * scale, math.cos(a) * scale, 0.0]], dtype=like.dtype, device=like.device)
    return theta.expand(batch, 2, 3)


def _warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)


@torch.no_grad()
def augmented_heatmaps(model: PoseTTPNet, images: torch.Tensor, perm, views=TEACHER_VIEWS) -> torch.Tensor:
    """The supervised heatmaps of `images` averaged over views: each view scales and rotates the images about their
    centre, adds its mirror (`perm` swaps left and right), and is mapped back onto the images' heatmap grid (the
    normalised coordinates of `affine_grid` are the same for the image and its quarter-size heatmaps)."""
    total = 0.0
    for scale, degrees in views:
        identity = scale == 1.0 and degrees == 0.0
        theta = _similarity(scale, degrees, len(images), images)
        seen = images if identity else _warp(images, theta)
        maps = 0.5 * (model.pose(seen)["h_sup"].float() + mirrored_heatmaps(model, seen, perm).float())
        if not identity:  # the view shows the image at x where theta x was: its maps go back by the inverse
            inverse = torch.linalg.inv(torch.cat([theta[0], theta.new_tensor([[0.0, 0.0, 1.0]])]))[:2]
            maps = _warp(maps, inverse.expand(len(images), 2, 3))
        total = total + maps
    return total / len(views)


@torch.no_grad()
def predict_crops(model: PoseTTPNet, crops: torch.Tensor, matrices: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """(N, 3, S, S) crops and their (N, 2, 3) crop affines -> (N, J, 3) [x, y, score] in original pixels.

    With `model.cfg.flip_test` each crop's heatmaps are averaged with its mirror's (mirrored back): twice the
    inference for a pose that no longer depends on which way the person faces.
    """
    was_training = model.training
    if was_training:  # walking the module tree costs about 1 ms: the online loop calls this for every frame
        model.eval()
    device = next(model.parameters()).device
    decode = DECODERS[model.cfg.decode]
    perm = joint_set(model.cfg.joint_set).flip_permutation() if model.cfg.flip_test else None
    out = []
    for i in range(0, len(crops), batch_size):
        batch = crops[i:i + batch_size].to(device)
        h_sup = model.pose(batch)["h_sup"].float()
        if perm is not None:
            h_sup = 0.5 * (h_sup + mirrored_heatmaps(model, batch, perm).float())
        coords, score = decode(h_sup)
        coords = heatmap_to_image(coords, model.cfg.image_size, h_sup.shape[-1]).cpu().numpy()
        for j, (c, s) in enumerate(zip(coords, score.cpu().numpy())):
            xy = apply_affine(c, invert(matrices[i + j]))
            out.append(np.concatenate([xy, s[:, None]], axis=1))
    if was_training:
        model.train()
    return np.stack(out).astype(np.float32) if out else np.zeros((0, model.cfg.num_joints, 3), np.float32)
