"""Losses: supervised heatmap MSE, the reconstruction loss (perceptual + pixel), rotation CE.

The perceptual network is a frozen VGG-16. ImageNet weights come from a local file
(`loss.vgg_weights`); `loss.perceptual` declares what happens without one
(`vgg16_random`: a frozen randomly initialised VGG, `none`: pixel terms only),
and the choice is logged. Each term is divided by a running mean kept as a
buffer, so it is saved in checkpoints and restored with them.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import LossConfig

log = logging.getLogger(__name__)

# VGG-16 `features` indices of relu1_2, relu2_2, relu3_2, relu4_2, relu5_2
VGG_LAYERS = (3, 8, 13, 20, 27)
VGG_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def supervised_loss(h_sup: torch.Tensor, target: torch.Tensor, visibility: torch.Tensor) -> torch.Tensor:
    """0.5 * MSE to unnormalised Gaussian targets, weighted per joint by visibility."""
    w = visibility.to(h_sup.dtype)[..., None, None]
    return 0.5 * ((h_sup - target) ** 2 * w).mean()


def vgg16_features() -> nn.Sequential:
    """torchvision's VGG-16 `features` layout, truncated after relu5_2."""
    layers: list[nn.Module] = []
    cin = 3
    for v in VGG_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=False)]
            cin = v
    return nn.Sequential(*layers[: VGG_LAYERS[-1] + 1])


def load_vgg_weights(features: nn.Sequential, path: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"loss.vgg_weights: no such file {path}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        state = torch.load(str(p), map_location="cpu", weights_only=True)
    state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    state = {k: v for k, v in state.items() if int(k.split(".")[0]) < len(features)}
    features.load_state_dict(state, strict=True)


class ReconstructionLoss(nn.Module):
    """sum_l MSE(phi_l(recon), phi_l(target)) / running_mean_l over pixels (+ VGG layers) (+ image gradients)."""

    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.cfg = cfg
        self.vgg: nn.Sequential | None = None
        if cfg.perceptual == "vgg16":
            if not cfg.vgg_weights:
                raise ValueError("loss.perceptual=vgg16 needs loss.vgg_weights (a local file); "
                                 "or choose loss.perceptual=vgg16_random or none explicitly")
            self.vgg = vgg16_features()
            load_vgg_weights(self.vgg, cfg.vgg_weights)
            self.mode = f"vgg16 ImageNet weights from {cfg.vgg_weights}"
        elif cfg.perceptual == "vgg16_random":
            self.vgg = vgg16_features()
            self.mode = "vgg16 with frozen random weights (no ImageNet file)"
        else:
            self.mode = "no perceptual network: pixel" + (" + gradient" if cfg.grad_weight else "") + " terms only"
        log.info("reconstruction loss: %s", self.mode)
        if self.vgg is not None:
            self.vgg.requires_grad_(False).eval()
            self.register_buffer("vgg_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
            self.register_buffer("vgg_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        n_terms = 1 + (len(VGG_LAYERS) if self.vgg is not None else 0) + (1 if cfg.grad_weight else 0)
        self.register_buffer("running_means", torch.ones(n_terms))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.vgg is not None:
            self.vgg.eval()
        return self

    def _vgg_feats(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.vgg_mean) / self.vgg_std
        feats = []
        for i, layer in enumerate(self.vgg):
            x = layer(x)
            if i in VGG_LAYERS:
                feats.append(x)
        return feats

    def pixel_weights(self, target: torch.Tensor, source: torch.Tensor | None) -> torch.Tensor | None:
        """Per-pixel weights (B, 1, H, W) with mean 1 that put `motion_focus` of the mass where target and
        source differ: with a static scene that is where the body moved, the only part of the target the
        source cannot explain, so copying the source no longer scores well and the keypoints must carry it.
        Needs no labels, so TTP uses the same loss."""
        if not self.cfg.motion_focus or source is None:
            return None
        motion = F.avg_pool2d((target - source).abs().mean(1, keepdim=True), 5, 1, 2)
        motion = motion / motion.mean(dim=(2, 3), keepdim=True).clamp_min(1e-6)
        return (1 - self.cfg.motion_focus) + self.cfg.motion_focus * motion

    def raw_terms(self, recon: torch.Tensor, target: torch.Tensor,
                  source: torch.Tensor | None = None) -> list[torch.Tensor]:
        w = self.pixel_weights(target, source)
        if w is None:
            terms = [F.mse_loss(recon, target) * self.cfg.pixel_weight]
        else:
            terms = [((recon - target) ** 2 * w).mean() * self.cfg.pixel_weight]
        if self.vgg is not None:
            with torch.no_grad():
                target_feats = self._vgg_feats(target)  # the target side needs no graph
            terms += [F.mse_loss(a, b) for a, b in zip(self._vgg_feats(recon), target_feats)]
        if self.cfg.grad_weight:
            terms.append(self.cfg.grad_weight * image_gradient_l1(recon, target, w))
        return terms

    def forward(self, recon: torch.Tensor, target: torch.Tensor, source: torch.Tensor | None = None,
                update_means: bool | None = None) -> torch.Tensor:
        terms = self.raw_terms(recon, target, source)
        stacked = torch.stack(terms)
        if update_means if update_means is not None else self.training:
            with torch.no_grad():
                m = self.cfg.running_mean_momentum
                current = stacked.detach().clamp_min(1e-8)
                if not bool(self.initialised):
                    self.running_means.copy_(current)
                    self.initialised.fill_(True)
                else:
                    self.running_means.mul_(m).add_(current * (1 - m))
        return (stacked / self.running_means).sum()


def image_gradient_l1(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    if w is None:
        return (dx(a) - dx(b)).abs().mean() + (dy(a) - dy(b)).abs().mean()
    wx, wy = (w[..., :, 1:] + w[..., :, :-1]) / 2, (w[..., 1:, :] + w[..., :-1, :]) / 2
    return ((dx(a) - dx(b)).abs() * wx).mean() + ((dy(a) - dy(b)).abs() * wy).mean()


def rotation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels)
