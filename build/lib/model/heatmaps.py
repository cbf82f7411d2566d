"""Heatmap targets, marginal soft-argmax, Gaussians and decoding (argmax + quarter shift, or DARK).

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


def _peaks(heatmaps: torch.Tensor):
    """Integer argmax (x, y) of each map, its value, and a reader of any (B, J, H, W) maps at an offset from it."""
    b, j, h, w = heatmaps.shape
    maxval, idx = heatmaps.reshape(b, j, -1).max(dim=-1)
    x, y = idx % w, torch.div(idx, w, rounding_mode="floor")
    rows = torch.arange(b * j, device=heatmaps.device)
    xf, yf = x.reshape(-1), y.reshape(-1)

    def at(maps: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
        return maps.reshape(b * j, h, w)[rows, (yf + dy).clamp(0, h - 1), (xf + dx).clamp(0, w - 1)].reshape(b, j)

    inner = (x > 0) & (x < w - 1) & (y > 0) & (y < h - 1)
    return x, y, maxval, at, inner


def decode_argmax(heatmaps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax + quarter-pixel shift toward the larger neighbour; returns (B, J, 2) xy and (B, J) peak values."""
    x, y, maxval, at, _ = _peaks(heatmaps)
    w, h = heatmaps.shape[-1], heatmaps.shape[-2]
    dx = torch.where((x > 0) & (x < w - 1), torch.sign(at(heatmaps, 1, 0) - at(heatmaps, -1, 0)) * 0.25, 0.0)
    dy = torch.where((y > 0) & (y < h - 1), torch.sign(at(heatmaps, 0, 1) - at(heatmaps, 0, -1)) * 0.25, 0.0)
    return torch.stack([x + dx, y + dy], dim=-1).to(heatmaps.dtype), maxval


def decode_dark(heatmaps: torch.Tensor, blur_sigma: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax refined to the top of a Gaussian fitted around it (DARK, Zhang et al., CVPR 2020).

    The quarter shift resolves half a heatmap pixel. At synth_small's stride 4 on 64-px crops that is 2 crop px,
    about the PCK@0.2 radius of its 96-px frames, so the grid, not the network, caps the score. The log of a
    Gaussian is a quadratic: one Newton step from the argmax on the smoothed log-heatmap finds its top. Maps
    without a proper peak there (flat, or not concave) keep the integer argmax. Returns what `decode_argmax` does.
    """
    x, y, maxval, at, inner = _peaks(heatmaps)
    b, j, h, w = heatmaps.shape
    radius = max(1, round(2 * blur_sigma))
    taps = torch.arange(-radius, radius + 1, dtype=heatmaps.dtype, device=heatmaps.device)
    kernel = torch.exp(-taps**2 / (2 * blur_sigma**2))
    kernel = kernel / kernel.sum()
    maps = F.pad(heatmaps.reshape(b * j, 1, h, w), (radius,) * 4, mode="replicate")
    maps = F.conv2d(F.conv2d(maps, kernel.view(1, 1, 1, -1)), kernel.view(1, 1, -1, 1)).reshape(b, j, h, w)
    floor = 1e-3 * maps.amax(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    log = torch.maximum(maps, floor).log()
    gx, gy = (at(log, 1, 0) - at(log, -1, 0)) / 2, (at(log, 0, 1) - at(log, 0, -1)) / 2
    hxx = at(log, 1, 0) - 2 * at(log, 0, 0) + at(log, -1, 0)
    hyy = at(log, 0, 1) - 2 * at(log, 0, 0) + at(log, 0, -1)
    hxy = (at(log, 1, 1) - at(log, 1, -1) - at(log, -1, 1) + at(log, -1, -1)) / 4
    det = hxx * hyy - hxy**2
    peak = inner & (hxx < 0) & (det > 1e-6)
    safe = torch.where(peak, det, torch.ones_like(det))
    dx = torch.where(peak, -(hyy * gx - hxy * gy) / safe, 0.0).clamp(-1, 1)
    dy = torch.where(peak, -(hxx * gy - hxy * gx) / safe, 0.0).clamp(-1, 1)
    return torch.stack([x + dx, y + dy], dim=-1).to(heatmaps.dtype), maxval


DECODERS = {"quarter": decode_argmax, "dark": decode_dark}


def image_to_heatmap(coords, image_size: int, heatmap_size: int):
    """Pixel-centre convention: image pixel centre u maps to heatmap (u + .5) * r - .5."""
    r = heatmap_size / image_size
    return (coords + 0.5) * r - 0.5


def heatmap_to_image(coords, image_size: int, heatmap_size: int):
    r = image_size / heatmap_size
    return (coords + 0.5) * r - 0.5
