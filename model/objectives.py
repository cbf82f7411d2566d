"""The training and test-time objectives of each variant, shared by joint training and TTP.

Joint training minimises L_sup + lambda * L_self; TTP minimises L_self alone.
L_self is the reconstruction loss for the keypoint variants and the
rotation-prediction loss for `shared_rotation`; the baseline has none.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .heatmaps import gaussian_maps, image_to_heatmap
from .losses import ReconstructionLoss, rotation_loss, supervised_loss
from .network import PoseTTPNet


def heatmap_targets(joints: torch.Tensor, image_size: int, sigma: float) -> torch.Tensor:
    """(B, J, 2) crop-pixel joints -> (B, J, h, h) Gaussian targets, h = image_size / 4."""
    size = image_size // 4
    return gaussian_maps(image_to_heatmap(joints, image_size, size), size, sigma)


def rotate_batch(images: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate each image by a random multiple of 90 degrees; returns (images, labels 0..3)."""
    labels = torch.randint(0, 4, (images.shape[0],), generator=generator)
    rotated = torch.stack([torch.rot90(img, int(k), dims=(1, 2)) for img, k in zip(images, labels)])
    return rotated, labels.to(images.device)


def self_loss(model: PoseTTPNet, recon_loss: ReconstructionLoss | None, target: torch.Tensor,
              source: torch.Tensor, h_self: torch.Tensor | None = None, frozen_appearance: bool = False,
              update_means: bool | None = None, rotations: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """The self-supervised loss of the model's variant (zero for the baseline).

    `rotations` draws the rotation variant's rotations (TTP passes a seeded one: a person's result must not depend
    on the global RNG, and the guard must score the base and the adapted model on the same rotations).

    `frozen_appearance` computes the source's appearance code without a graph,
    which is exact whenever the appearance encoder does not adapt (TTP default).
    """
    if model.has_reconstruction:
        h_self = model.self_logits(target) if h_self is None else h_self
        appearance = None
        if frozen_appearance:
            with torch.no_grad():
                appearance = model.appearance(source)
        rec = model.reconstruct(h_self, source, appearance)
        loss = recon_loss(rec["recon"].float(), target, source, update_means=update_means)
        return loss, {"recon": rec["recon"], "kp_coords": rec["kp_coords"]}
    if model.variant == "shared_rotation":
        rotated, labels = rotate_batch(target, rotations)
        return rotation_loss(model.rotation_head(model.encoder(rotated)), labels), {}
    return target.new_zeros(()), {}


@torch.no_grad()
def pose_signal(model: PoseTTPNet, recon_loss: ReconstructionLoss | None, target: torch.Tensor,
                source: torch.Tensor) -> tuple[float, float]:
    """The self-supervised loss on (target, source) pairs, and how much it rises when the targets' keypoints are
    swapped between pairs (swapped / own): near 1, the loss does not depend on where the keypoints are."""
    h_self = model.self_logits(target)
    own, _ = self_loss(model, recon_loss, target, source, h_self=h_self, update_means=False)
    swapped, _ = self_loss(model, recon_loss, target, source, h_self=h_self.roll(1, 0), update_means=False)
    return float(own), float(swapped) / max(float(own), 1e-12)


def flip_consistency(h_sup: torch.Tensor, mirrored: torch.Tensor) -> torch.Tensor:
    """Label-free agreement of the pose with its mirror image: half the mean squared difference between the
    supervised heatmaps of some images (`h_sup`) and those of the mirrored images, mirrored back with left and right
    swapped (`mirrored`, from `predict.mirrored_heatmaps`). A steady sideways offset that a joint shares with its
    left/right partner shows here as twice itself, where the reconstruction hardly sees it. Lower, flatter maps
    also lower it: the trust region bounds how far that can go."""
    return 0.5 * F.mse_loss(h_sup.float(), mirrored.float())


def mirror_pseudo_labels(h_sup: torch.Tensor, mirrored: torch.Tensor, sigma: float, decode,
                         agreement: float = 0.0) -> torch.Tensor:
    """Self-training on the mirror ensemble: the heatmaps of each image and of its mirror (mirrored back) are both
    pulled toward one sharp Gaussian (peak 1, the training targets' `sigma`) at the decoded position of their
    average. The average is what the flip test predicts, more accurate than either view; the target carries no
    gradient and stays sharp, so unlike `flip_consistency` lower, flatter maps are no way to lower it, and as the
    person's weights adapt the target improves with them.

    `agreement` > 0 keeps only the joints whose two views decode at most that many heatmap pixels apart: where the
    views disagree, their average is a guess between two poses, and a pseudo-label there teaches the guess."""
    own, other = h_sup.float(), mirrored.float()
    with torch.no_grad():
        coords, _ = decode(0.5 * (own + other))
        keep = ((decode(own)[0] - decode(other)[0]).norm(dim=-1) <= agreement).float() if agreement else None
    return 0.5 * (sharp_pseudo_labels(own, coords, sigma, keep) + sharp_pseudo_labels(other, coords, sigma, keep))


def sharp_pseudo_labels(h_sup: torch.Tensor, coords: torch.Tensor, sigma: float,
                        keep: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared distance of heatmaps (B, J, h, h) to sharp Gaussians (peak 1, `sigma`) at detached heatmap
    coordinates (B, J, 2); `keep` (B, J) or (J,) of 0/1 masks joints out. Every pseudo-label term ends here: its
    target stays sharp, so lower, flatter maps are no way to lower it."""
    goal = gaussian_maps(coords.detach(), h_sup.shape[-1], sigma)
    error = (h_sup.float() - goal).square().mean((-2, -1))
    return (error if keep is None else error * keep).mean()


def self_weight(model: PoseTTPNet, lam: float, rotation_weight: float) -> float:
    if model.has_reconstruction:
        return lam
    return rotation_weight if model.variant == "shared_rotation" else 0.0


def joint_loss(model, core: PoseTTPNet, recon_loss: ReconstructionLoss | None, batch: dict, lam: float,
               rotation_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """L_sup + w * L_self for one batch of pairs in a single forward of `model`.

    `model` may be a DDP wrapper of `core`; returns (loss, float terms for logging).
    """
    target, source = batch["target"], batch["source"]
    weight = self_weight(core, lam, rotation_weight)
    rotated = labels = None
    if core.variant == "shared_rotation" and weight:
        rotated, labels = rotate_batch(target)
    out = model(target, source if (core.has_reconstruction and weight) else None, rotated)
    hm_target = heatmap_targets(batch["joints"], core.cfg.image_size, core.cfg.sigma)
    l_sup = supervised_loss(out["h_sup"].float(), hm_target, batch["visible"])
    if "recon" in out:
        l_self = recon_loss(out["recon"].float(), target, source)
    elif "rotation" in out:
        l_self = rotation_loss(out["rotation"].float(), labels)
    else:
        l_self = l_sup.new_zeros(())
    loss = l_sup + weight * l_self
    return loss, {"loss": float(loss.detach()), "l_sup": float(l_sup.detach()), "l_self": float(l_self.detach())}
