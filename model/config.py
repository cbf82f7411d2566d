"""Typed configuration with YAML files and `--set dotted.key=value` overrides.

Typed defaults live here so that a YAML file only states what differs, and a
misspelt key fails loudly instead of being ignored.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration file or override that cannot be applied."""


@dataclass
class ModelConfig:
    variant: str = "transformer"  # baseline | shared_rotation | shared_keypoint | transformer
    backbone: str = "small"  # small | resnet18 | resnet50
    image_size: int = 128
    num_joints: int = 13
    num_keypoints: int = 30
    feat_channels: int = 256  # channels of the feature map F
    small_width: int = 32  # width of the small CPU backbone
    render_width: int = 32  # base width of appearance/keypoint encoders and renderer
    render_skip: bool = False  # source image as a skip into the last renderer stage (beyond the paper)
    heads: int = 4
    ffn: int = 1024
    dropout: float = 0.1
    sigma: float = 2.0  # Gaussian sigma on the heatmap grid (supervised targets)
    kp_beta: float = 0.0  # >0: standardise each H_self map, scale by kp_beta, then soft-argmax; 0 = raw logits
    kp_sigma: float = 0.0  # sigma of the self-supervised keypoint Gaussians fed to the renderer; 0 = sigma
    # >0: the skip is the source warped by the keypoint motion source -> target (model/warp.py), each keypoint
    # moving the pixels within this sigma (heatmap px); needs render_skip
    warp_sigma: float = 0.0
    pretrained: str = ""  # local path to ImageNet ResNet weights; empty = random init (logged)
    # inference only: quarter (the released code's argmax + quarter-pixel shift) | dark (a Gaussian fitted to the
    # peak, sub-pixel: model.heatmaps.decode_dark); a coarse heatmap grid (synth_small: stride 4 on 64 px) needs it
    decode: str = "quarter"
    # inference only: average each crop's heatmaps with its mirror's (model.predict.predict_crops); twice the
    # inference, a pose that does not depend on which way the person faces
    flip_test: bool = False


@dataclass
class LossConfig:
    lam: float = 1e-3  # weight of L_self in the joint loss
    perceptual: str = "none"  # vgg16 (needs vgg_weights) | vgg16_random | none
    vgg_weights: str = ""
    pixel_weight: float = 1.0
    grad_weight: float = 0.0  # L1 on image x/y gradients (cheap stand-in for perceptual)
    motion_focus: float = 0.0  # 0..1: share of the pixel/gradient loss weighted by |target - source| (label-free)
    rotation_weight: float = 1e-4  # shared_rotation variant
    running_mean_momentum: float = 0.99


@dataclass
class DataConfig:
    url: str = ""
    dataset: str = "synth"  # synth | penn | bbc | h36m
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    scale_std: float = 0.25
    rot_std: float = 30.0
    rot_prob: float = 0.6
    flip_prob: float = 0.5
    # probability that a training pair's source comes from another video of the person (cropped by its own box):
    # the reconstruction must then explain a change of view, where a per-video keypoint offset shows
    cross_video: float = 0.0
    num_workers: int = 0


@dataclass
class TrainConfig:
    max_steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    lr_steps: list = field(default_factory=lambda: [0.64, 0.86])
    seed: int = 0
    report_every: int = 200  # steps between ray.train.report (each costs seconds)
    val_frames: int = 256
    amp: str = "auto"  # auto (bf16 where the GPU/CPU has native bf16) | bf16 | off
    threads: int = 0  # torch threads per worker; 0 = torch default


@dataclass
class TTPConfig:
    lr: float = 1e-4
    steps: int = 60  # offline update steps
    iters: int = 1  # online updates per frame
    batch_size: int = 8
    optimizer: str = "adam"
    adapt: list = field(default_factory=lambda: ["encoder", "self_head"])
    reset_every: int = 0  # online: reset to base every N frames (0 = never)
    guard: bool = True
    guard_ratio: float = 1.5  # self-supervised loss above ratio * reference = divergence
    guard_window: int = 5
    # ... and when the mean peak of the supervised heatmaps on the probe frames falls below this ratio of the
    # base model's (the pose head grows less sure of itself: TTP is pulling the features away); 0 = off
    guard_confidence: float = 1.0
    # Pose-signal check: adapt only if swapping the keypoints between probe frames raises the base model's
    # loss by this ratio (else the loss cannot tell a right pose from a wrong one); 0 = off
    min_pose_signal: float = 1.02
    signal_frames: int = 16  # online: frames seen before the check; no adaptation until then
    cross_video: float = 0.0  # probability that a TTP pair's source comes from another (earlier) video
    # Trust region: no adapted weight moves further from its base value than this many learning-rate-sized steps
    # (Adam moves each weight by about lr per step), however many updates run; 0 = unbounded
    drift_steps: float = 0.0
    # beyond the paper: weight of the supervised heatmaps' agreement with their mirror image in the TTP loss
    # (`model.objectives.flip_consistency`); 0 = the paper's reconstruction loss alone
    flip_weight: float = 0.0
    # beyond the paper: weight of self-training toward the flip test's prediction, a sharp Gaussian without gradient
    # (`model.objectives.mirror_pseudo_labels`); 0 = off
    pseudo_label_weight: float = 0.0
    # pseudo-labels only for joints whose two views decode at most this many heatmap pixels apart; 0 = every joint
    pseudo_label_agreement: float = 0.0
    amp: str = "auto"  # bf16 autocast of the update step: auto (where the CPU/GPU has native bf16) | bf16 | off
    channels_last: bool = True  # NHWC layout for the person's model copy (faster oneDNN convolutions)
    seed: int = 0

    @property
    def drift_radius(self) -> float:
        """How far (absolute) TTP may move any adapted weight from its base value; inf without a trust region.
        Also what the Flower server holds honest clients' deltas to (`server.fl.make_store`)."""
        return self.drift_steps * self.lr if self.drift_steps > 0 else float("inf")


@dataclass
class Config:
    name: str = "posettp"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ttp: TTPConfig = field(default_factory=TTPConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


VARIANTS = ("baseline", "shared_rotation", "shared_keypoint", "transformer")
BACKBONES = ("small", "resnet18", "resnet50")
AMP_MODES = ("auto", "bf16", "off")
DECODINGS = ("quarter", "dark")  # model.heatmaps.DECODERS


def _coerce(value: Any, current: Any, key: str) -> Any:
    """Convert an override string or YAML value to the type of the default."""
    if isinstance(value, str) and not isinstance(current, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{key}: cannot parse {value!r}: {exc}") from exc
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if isinstance(current, int) and not isinstance(current, bool):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if isinstance(current, float):
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if isinstance(current, list):
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return value
    if isinstance(current, str):
        return str(value)
    return value


def _apply(obj: Any, key: str, value: Any) -> None:
    parts = key.split(".")
    target = obj
    for i, part in enumerate(parts[:-1]):
        if not dataclasses.is_dataclass(target) or part not in {f.name for f in dataclasses.fields(target)}:
            raise ConfigError(f"unknown config key: {'.'.join(parts[: i + 1])}")
        target = getattr(target, part)
    leaf = parts[-1]
    if not dataclasses.is_dataclass(target) or leaf not in {f.name for f in dataclasses.fields(target)}:
        raise ConfigError(f"unknown config key: {key}")
    current = getattr(target, leaf)
    if dataclasses.is_dataclass(current):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping")
        for sub, sub_value in value.items():
            _apply(obj, f"{key}.{sub}", sub_value)
        return
    setattr(target, leaf, _coerce(value, current, key))


def _validate(cfg: Config) -> None:
    if cfg.model.variant not in VARIANTS:
        raise ConfigError(f"model.variant must be one of {VARIANTS}, got {cfg.model.variant!r}")
    if cfg.model.backbone not in BACKBONES:
        raise ConfigError(f"model.backbone must be one of {BACKBONES}, got {cfg.model.backbone!r}")
    if cfg.model.image_size % 32:
        raise ConfigError(f"model.image_size must be a multiple of 32, got {cfg.model.image_size}")
    if cfg.model.decode not in DECODINGS:
        raise ConfigError(f"model.decode must be one of {DECODINGS}, got {cfg.model.decode!r}")
    mirrored = [key for key, on in (("model.flip_test", cfg.model.flip_test), ("ttp.flip_weight", cfg.ttp.flip_weight),
                                    ("ttp.pseudo_label_weight", cfg.ttp.pseudo_label_weight)) if on]
    if mirrored:
        from .transforms import flip_pairs_for

        try:
            flip_pairs_for(cfg.model.num_joints)
        except ValueError as exc:
            raise ConfigError(f"{mirrored[0]}: {exc}") from None
    for key in ("flip_weight", "pseudo_label_weight", "pseudo_label_agreement"):
        if getattr(cfg.ttp, key) < 0:
            raise ConfigError(f"ttp.{key} must be >= 0 (0 = off), got {getattr(cfg.ttp, key)}")
    if cfg.ttp.pseudo_label_agreement and not cfg.ttp.pseudo_label_weight:
        raise ConfigError("ttp.pseudo_label_agreement gates the pseudo-labels of ttp.pseudo_label_weight, which is 0: "
                          "set both")
    if cfg.model.warp_sigma and not cfg.model.render_skip:
        raise ConfigError("model.warp_sigma warps the renderer's skip: it needs model.render_skip: true")
    if cfg.loss.perceptual not in ("vgg16", "vgg16_random", "none"):
        raise ConfigError(f"loss.perceptual must be vgg16, vgg16_random or none, got {cfg.loss.perceptual!r}")
    for key, p in (("data.cross_video", cfg.data.cross_video), ("ttp.cross_video", cfg.ttp.cross_video)):
        if not 0 <= p <= 1:
            raise ConfigError(f"{key} is a probability, got {p}")
    if cfg.ttp.drift_steps < 0:
        raise ConfigError(f"ttp.drift_steps must be >= 0 (0 = no trust region), got {cfg.ttp.drift_steps}")
    for name in cfg.ttp.adapt:
        if name not in ("encoder", "self_head", "appearance", "kp_encoder", "renderer"):
            raise ConfigError(f"ttp.adapt: {name!r} may not adapt at test time")
    for key, mode in (("train.amp", cfg.train.amp), ("ttp.amp", cfg.ttp.amp)):
        if mode not in AMP_MODES:
            raise ConfigError(f"{key} must be one of {AMP_MODES}, got {mode!r}")


def from_dict(data: dict) -> Config:
    cfg = Config()
    for key, value in (data or {}).items():
        _apply(cfg, key, value)
    _validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults) and apply `dotted.key=value` overrides."""
    data: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    cfg = Config()
    for key, value in data.items():
        _apply(cfg, key, value)
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: Config, overrides: list[str] | None) -> Config:
    """Apply `dotted.key=value` strings in place (and validate); returns cfg."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects dotted.key=value, got {item!r}")
        key, value = item.split("=", 1)
        _apply(cfg, key.strip(), value)
    _validate(cfg)
    return cfg
