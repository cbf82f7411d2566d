"""Inference: crop -> network -> decode -> original image coordinates, in one place for every caller."""
from __future__ import annotations

import numpy as np
import torch

from .heatmaps import DECODERS, heatmap_to_image
from .network import PoseTTPNet
from .joints import joint_set
from .transforms import apply_affine, invert


def mirrored_heatmaps(model: PoseTTPNet, images: torch.Tensor, perm) -> torch.Tensor:
    """Supervised heatmaps of the mirrored `images`, mirrored back with left and right swapped (`perm`): the
    heatmaps' pixel-centre grid mirrors exactly onto itself, so they line up with those of `images`."""
    return model.pose(images.flip(-1))["h_sup"].flip(-1)[:, perm]


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
