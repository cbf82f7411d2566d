"""The TTP network (Li et al., NeurIPS 2021) and its Table-1 variants, top to bottom.

Submodule names are a contract (deltas and freezing rules use them):
`encoder` (backbone + deconvs) -> F; `self_head` (psi_self, 1x1 conv to 30
keypoint logits); `sup_head` (Transformer affinity head, or a 1x1 head for the
baseline/shared variants); `appearance`, `kp_encoder`, `renderer` (the
reconstruction branch); `rotation_head` (shared_rotation only).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbones import build_backbone
from .config import ModelConfig
from .heatmaps import gaussian_profiles, heatmap_to_image, marginal_soft_argmax
from .warp import keypoint_warp


def conv_bn_relu(cin: int, cout: int, k: int = 3, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class Encoder(nn.Module):
    """Backbone followed by stride-2 deconvolutions up to the heatmap resolution (image / 4)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.backbone, channels, stride = build_backbone(cfg)
        layers: list[nn.Module] = []
        while stride > 4:
            layers += [nn.ConvTranspose2d(channels, cfg.feat_channels, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(cfg.feat_channels), nn.ReLU(inplace=True)]
            channels, stride = cfg.feat_channels, stride // 2
        self.deconv = nn.Sequential(*layers)
        for m in self.deconv.modules():  # SimpleBaseline's init, as in the released code
            if isinstance(m, nn.ConvTranspose2d):
                nn.init.normal_(m.weight, std=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.deconv(self.backbone(x))


class ConvEncoder(nn.Module):
    """Image-to-16x16 encoder of the reconstruction branch (appearance and keypoint encoders)."""

    def __init__(self, cin: int, width: int):
        super().__init__()
        w = width
        spec = [(cin, w, 7, 1), (w, w, 3, 1), (w, 2 * w, 3, 2), (2 * w, 2 * w, 3, 1),
                (2 * w, 4 * w, 3, 2), (4 * w, 4 * w, 3, 1), (4 * w, 8 * w, 3, 2), (8 * w, 8 * w, 3, 1)]
        self.net = nn.Sequential(*[m for a, b, k, s in spec for m in conv_bn_relu(a, b, k, s)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def forward_rank1(self, gx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
        """`forward` of the maps x = gy[..., :, None] * gx[..., None, :] (B, K, H, W), without building them.

        Every input channel is an outer product, so the first (stride-1, zero-padded) convolution splits
        into a 1-D convolution along x and a contraction along y: 7x fewer multiply-adds for its 7x7 kernel,
        and no K x H x W maps to build, lay out and back-propagate through. On the keypoint maps it was the
        costliest layer of a TTP step (measured in bench/ttp_step.py).
        """
        conv = self.net[0]
        size, pad = conv.kernel_size[0], conv.padding[0]

        def windows(g: torch.Tensor) -> torch.Tensor:  # (B, K, L) -> (B, K, L, size): zero-padded sliding windows
            return F.pad(g, (pad, pad)).unfold(-1, size, 1)

        along_x = torch.einsum("ckij,bkxj->bkixc", conv.weight, windows(gx))
        out = torch.einsum("bkyi,bkixc->byxc", windows(gy), along_x).permute(0, 3, 1, 2)  # channels-last
        if conv.bias is not None:
            out = out + conv.bias.view(1, -1, 1, 1)
        return self.net[1:](out)


class Renderer(nn.Module):
    """Decodes concat[appearance, keypoint code] back to an image; no output activation.

    With `skip`, an image joins the last stage (beyond the paper: it lets the renderer copy texture
    so that the keypoints must explain where parts moved): the source, or the source warped by the
    keypoint motion (`model.warp_sigma`).
    """

    def __init__(self, width: int, skip: bool):
        super().__init__()
        w = width
        blocks = []
        for cin, cout in [(16 * w, 8 * w), (8 * w, 4 * w), (4 * w, 2 * w), (2 * w, w)]:
            blocks.append(nn.Sequential(*conv_bn_relu(cin, cout), *conv_bn_relu(cout, cout)))
        self.blocks = nn.ModuleList(blocks)
        self.skip = skip
        self.out = nn.Conv2d(w + (3 if skip else 0), 3, 3, 1, 1)

    def forward(self, code: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = code
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i < len(self.blocks) - 1:
                x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.skip:
            x = torch.cat([x, skip], dim=1)
        return self.out(x)


class TransformerAffinityHead(nn.Module):
    """13 learnable queries attend to the flattened feature map; W = softmax over the 30 keypoints."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c = cfg.feat_channels
        self.queries = nn.Parameter(torch.randn(cfg.num_joints, c) * 0.02)
        layer = nn.TransformerDecoderLayer(c, cfg.heads, cfg.ffn, cfg.dropout, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, num_layers=1, norm=nn.LayerNorm(c))
        self.proj = nn.Linear(c, cfg.num_keypoints)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        tokens = feats.flatten(2).transpose(1, 2)  # (B, HW, C), no positional encoding
        q = self.queries.unsqueeze(0).expand(feats.shape[0], -1, -1)
        return F.softmax(self.proj(self.decoder(q, tokens)), dim=-1)  # (B, 13, 30)


class RotationHead(nn.Module):
    """Predicts which of 4 rotations (0/90/180/270) was applied: the shared_rotation self-task."""

    def __init__(self, c: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(c, c, 3, 2, 1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(c, 4))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net(feats)


class PoseTTPNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.variant = cfg.variant
        self.encoder = Encoder(cfg)
        c = cfg.feat_channels
        if self.variant in ("shared_keypoint", "transformer"):
            # PyTorch's default init on purpose: logits of order 1 scatter the 30 keypoints over the image
            # from the first step, so the renderer learns to use them. A near-zero init (SimpleBaseline's
            # std 0.001) puts every keypoint at the centre, the renderer learns to ignore them and the
            # reconstruction never depends on the pose (measured: shuffling keypoints changed nothing).
            self.self_head = nn.Conv2d(c, cfg.num_keypoints, 1)
            self.kp_encoder = ConvEncoder(cfg.num_keypoints, cfg.render_width)
            self.appearance = ConvEncoder(3, cfg.render_width)
            self.renderer = Renderer(cfg.render_width, cfg.render_skip)
        if self.variant == "transformer":
            self.sup_head = TransformerAffinityHead(cfg)
        else:
            self.sup_head = nn.Conv2d(c, cfg.num_joints, 1)
            nn.init.normal_(self.sup_head.weight, std=0.001)
            nn.init.zeros_(self.sup_head.bias)
        if self.variant == "shared_rotation":
            self.rotation_head = RotationHead(c)

    @property
    def has_reconstruction(self) -> bool:
        return self.variant in ("shared_keypoint", "transformer")

    @property
    def heatmap_size(self) -> int:
        return self.cfg.image_size // 4

    def pose(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Inference path: encoder, self_head and sup_head only."""
        feats = self.encoder(image)
        out: dict[str, torch.Tensor] = {"feats": feats}
        if self.variant == "transformer":
            h_self = self.self_head(feats)
            w = self.sup_head(feats)
            out.update(h_self=h_self, affinity=w, h_sup=torch.einsum("bjk,bkhw->bjhw", w, h_self))
        else:
            out["h_sup"] = self.sup_head(feats)
            if self.variant == "shared_keypoint":
                out["h_self"] = self.self_head(feats)
        return out

    def self_logits(self, image: torch.Tensor) -> torch.Tensor:
        """H_self alone (encoder + self_head): all that the reconstruction task needs from the target."""
        return self.self_head(self.encoder(image))

    def keypoint_coords(self, h_self: torch.Tensor) -> torch.Tensor:
        """(B, K, 2) condensed self-supervised keypoints in heatmap units."""
        if self.cfg.kp_beta:
            # The supervised loss keeps H_self in about [0, 1], so raw logits give a flat softmax and every
            # keypoint drifts to the image centre; a standardised, scaled map follows its peak instead.
            mean = h_self.mean(dim=(2, 3), keepdim=True)
            std = h_self.std(dim=(2, 3), keepdim=True).clamp_min(1e-4)
            h_self = (h_self - mean) / std * (self.cfg.kp_beta / h_self.shape[-2])
        return marginal_soft_argmax(h_self)

    def keypoint_gaussians(self, h_self: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Condensed keypoints (heatmap units) and the x/y factors of their Gaussians at the image size."""
        coords = self.keypoint_coords(h_self)
        sigma = self.cfg.kp_sigma or self.cfg.sigma
        return coords, gaussian_profiles(coords, h_self.shape[-1], sigma, self.cfg.image_size)

    def reconstruct(self, h_self: torch.Tensor, source: torch.Tensor,
                    appearance: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Render the target from its keypoints and the source's appearance (precomputed if given)."""
        coords, (gx, gy) = self.keypoint_gaussians(h_self)
        appearance = self.appearance(source) if appearance is None else appearance
        code = torch.cat([appearance, self.kp_encoder.forward_rank1(gx, gy)], dim=1)
        return {"recon": self.renderer(code, self.skip_image(source, coords)), "kp_coords": coords}

    def skip_image(self, source: torch.Tensor, kp_target: torch.Tensor) -> torch.Tensor:
        """The renderer's skip: the source, or (`warp_sigma`) the source moved along the keypoint motion.

        The source's keypoints carry no gradient: the target's keypoints alone must explain the target.
        """
        if not self.cfg.warp_sigma:
            return source
        with torch.no_grad():
            kp_source = self.keypoint_coords(self.self_logits(source))
        size, scale = self.cfg.image_size, self.cfg.image_size / self.heatmap_size
        return keypoint_warp(source, heatmap_to_image(kp_source, size, self.heatmap_size),
                             heatmap_to_image(kp_target, size, self.heatmap_size), self.cfg.warp_sigma * scale)

    def forward(self, target: torch.Tensor, source: torch.Tensor | None = None,
                rotated: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Everything one joint-training step needs, in one call (so DDP sees a single forward)."""
        out = self.pose(target)
        if source is not None and self.has_reconstruction:
            out.update(self.reconstruct(out["h_self"], source))
        if rotated is not None and self.variant == "shared_rotation":
            out["rotation"] = self.rotation_head(self.encoder(rotated))
        return out


def build_model(cfg: ModelConfig) -> PoseTTPNet:
    return PoseTTPNet(cfg)


def parameter_counts(model: PoseTTPNet) -> dict[str, int]:
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in model.named_children()}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def pose_gflops(model: PoseTTPNet) -> float:
    """GFLOP (2 per multiply-add) of one pose forward on one image: encoder, self_head, sup_head."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, model.cfg.image_size, model.cfg.image_size)
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model.pose(x)
    model.train(was_training)
    return counter.get_total_flops() / 1e9
