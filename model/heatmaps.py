"""Heatmap targets, marginal soft-argmax, Gaussians and argmax decoding.

One codec for training targets, the self-supervised bottleneck and inference
decoding, so the three can never disagree on coordinate conventions: a heatmap
pixel (i, j) has centre (x=j, y=i) in heatmap units.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def gaussian_maps(coords: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Unnormalised Gaussians (peak 1) at (B, K, 2) xy coords on a size x size grid."""
    gx, gy = gaussian_profiles(coords, size, sigma)
    return gy[..., :, None] * gx[..., None, :]


def gaussian_profiles(coords: torch.Tensor, size: int, sigma: float,
                      out_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The x and y factors (B, K, size) of `gaussian_maps`: map = gy[..., :, None] * gx[..., None, :].

    With `out_size`, the factors of the maps bilinearly upsampled (align_corners=False) to out_size: the
    interpolation is separable too, so upsampling each factor gives exactly `F.interpolate` of the maps
    (the reconstruction runs this in every training and TTP step, and never needs the maps themselves).
    """
    grid = torch.arange(size, dtype=coords.dtype, device=coords.device)
    gx = torch.exp(-((grid - coords[..., 0, None]) ** 2) / (2 * sigma**2))
    gy = torch.exp(-((grid - coords[..., 1, None]) ** 2) / (2 * sigma**2))
    if out_size is not None:
        up = _linear_upsampling(size, out_size).to(gx)
        gx, gy = gx @ up, gy @ up
    return gx, gy


@functools.lru_cache(maxsize=8)
def _linear_upsampling(size: int, out_size: int) -> torch.Tensor:
    """(size, out_size) matrix of 1-D linear interpolation, align_corners=False (F.interpolate of each impulse)."""
    impulses = torch.eye(size, dtype=torch.float64).unsqueeze(1)
    return F.interpolate(impulses, size=out_size, mode="linear", align_corners=False).squeeze(1).float()


def marginal_soft_argmax(logits: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) raw logits -> (B, K, 2) expected xy: sum the logits over one axis, softmax the other."""
    _, _, h, w = logits.shape
    px = F.softmax(logits.sum(dim=2), dim=-1)  # (B, K, W)
    py = F.softmax(logits.sum(dim=3), dim=-1)  # (B, K, H)
    xs = torch.arange(w, dtype=logits.dtype, device=logits.device)
    ys = torch.arange(h, dtype=logits.dtype, device=logits.device)
    return torch.stack([(px * xs).sum(-1), (py * ys).sum(-1)], dim=-1)


def decode_argmax(heatmaps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax + quarter-pixel shift toward the larger neighbour; returns (B, J, 2) xy and (B, J) peak values."""
    b, j, h, w = heatmaps.shape
    flat = heatmaps.reshape(b, j, -1)
    maxval, idx = flat.max(dim=-1)
    x = (idx % w).long()
    y = torch.div(idx, w, rounding_mode="floor").long()
    hm = heatmaps.reshape(b * j, h, w)
    xf, yf = x.reshape(-1), y.reshape(-1)
    rows = torch.arange(b * j, device=heatmaps.device)
    right = hm[rows, yf, (xf + 1).clamp(max=w - 1)]
    left = hm[rows, yf, (xf - 1).clamp(min=0)]
    down = hm[rows, (yf + 1).clamp(max=h - 1), xf]
    up = hm[rows, (yf - 1).clamp(min=0), xf]
    inner_x = (xf > 0) & (xf < w - 1)
    inner_y = (yf > 0) & (yf < h - 1)
    dx = torch.where(inner_x, torch.sign(right - left) * 0.25, torch.zeros_like(right))
    dy = torch.where(inner_y, torch.sign(down - up) * 0.25, torch.zeros_like(down))
    coords = torch.stack([xf.to(heatmaps.dtype) + dx, yf.to(heatmaps.dtype) + dy], dim=-1)
    return coords.reshape(b, j, 2), maxval


def image_to_heatmap(coords, image_size: int, heatmap_size: int):
    """Pixel-centre convention: image pixel centre u maps to heatmap (u + .5) * r - .5."""
    r = heatmap_size / image_size
    return (coords + 0.5) * r - 0.5


def heatmap_to_image(coords, image_size: int, heatmap_size: int):
    r = image_size / heatmap_size
    return (coords + 0.5) * r - 0.5
