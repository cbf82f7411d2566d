"""Backbones built locally: torchvision-compatible ResNet-18/50 and a small CPU backbone.

Parameter names follow torchvision's so that an ImageNet state dict from a local
file loads directly; nothing is ever downloaded.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn

from .config import ModelConfig

log = logging.getLogger(__name__)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, planes, stride)

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + idt)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, planes * 4, stride)

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + idt)


def _shortcut(cin: int, cout: int, stride: int):
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNet(nn.Module):
    """ResNet without avgpool/fc: image -> stride-32 features."""

    def __init__(self, block, layers: list[int]):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, planes, 2 if (j == 0 and i > 0) else 1))
                cin = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.out_channels = cin

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class SmallBackbone(nn.Module):
    """A CPU-sized stride-8 conv net. GroupNorm: a TTP batch that repeats one frame cannot skew it."""

    def __init__(self, width: int):
        super().__init__()
        w = width
        spec = [(3, w, 2), (w, w, 1), (w, 2 * w, 2), (2 * w, 2 * w, 1), (2 * w, 4 * w, 2), (4 * w, 4 * w, 1)]
        layers: list[nn.Module] = []
        for cin, cout, s in spec:
            layers += [nn.Conv2d(cin, cout, 3, s, 1, bias=False), nn.GroupNorm(8, cout), nn.ReLU(inplace=True)]
        self.net = nn.Sequential(*layers)
        self.out_channels = 4 * w

    def forward(self, x):
        return self.net(x)


def build_backbone(cfg: ModelConfig) -> tuple[nn.Module, int, int]:
    """Returns (module, output channels, output stride)."""
    if cfg.backbone == "small":
        net = SmallBackbone(cfg.small_width)
        stride = 8
    else:
        block, layers = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet50": (Bottleneck, [3, 4, 6, 3])}[cfg.backbone]
        net, stride = ResNet(block, layers), 32
    if cfg.pretrained:
        load_pretrained(net, cfg.pretrained)
    else:
        log.debug("backbone %s: random initialisation (model.pretrained is empty)", cfg.backbone)
    return net, net.out_channels, stride


def load_pretrained(net: nn.Module, path: str) -> None:
    """Load ImageNet weights from a local safetensors or torch file (fc.* ignored); never downloads."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model.pretrained: no such file {path}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        state = torch.load(str(p), map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the backbone (missing {missing[:3]}, unexpected {unexpected[:3]})")
    log.info("backbone: ImageNet weights loaded from %s", path)
