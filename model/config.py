"""Typed configuration with YAML files and `--set dotted.key=value` overrides.

Typed defaults live here so that a YAML file only states what differs, and a
misspelt key fails loudly instead of being ignored. Every field carries a one-line
help text; the knobs that go beyond the paper are marked `research` and sit after
the paper's settings in each section, so that a reader (and `posettp.settings_doc`)
can tell the method from the experiments.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .joints import DATASET_JOINT_SETS, JOINT_SETS


class ConfigError(ValueError):
    """A configuration file or override that cannot be applied."""


# The shipped configs: `configs/` beside the packages, in a checkout and in an installed wheel alike
SHIPPED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def shipped_configs() -> list[str]:
    return sorted(f.stem for f in SHIPPED_CONFIGS.glob("*.yaml"))


def config_path(name_or_path: str | Path) -> Path:
    """A config file by path, or a shipped config by name (`synth_small`, `synth_small.yaml` or
    `configs/synth_small.yaml`) from any working directory."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = SHIPPED_CONFIGS / (p.name if p.suffix == ".yaml" else f"{p.name}.yaml")
    if p.parent in (Path("."), Path("configs")) and shipped.is_file():
        return shipped
    raise ConfigError(f"config not found: {name_or_path} (give a path, or a shipped config: "
                      f"{', '.join(shipped_configs())})")


def setting(default: Any, help: str, *, research: bool = False) -> Any:
    """A settings field with its help line; a list default becomes a per-instance copy."""
    meta = {"help": help, "research": research}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def research(default: Any, help: str) -> Any:
    """A knob beyond the paper (an experiment of this project, not the paper's method)."""
    return setting(default, help, research=True)


def is_research(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("research"))


def help_of(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _split_list(text: str) -> list[str]:
    """`[a, b]` or `a,b` -> ["a", "b"]: lists as `--set` and `serve run k=v` spell them."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    return [part.strip().strip("'\"") for part in text.split(",") if part.strip()]


def _coerce(value: Any, kind: Any, label: str) -> Any:
    """`value` as the annotated type `kind` (bool, int, float, str, list[...]); strings are parsed."""
    origin = typing.get_origin(kind) or kind
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"{label}: expected true or false, got {value!r}")
    if kind is int:
        for parse in (int, float):  # "3", then "3.0" or "1e3"
            if isinstance(value, str):
                try:
                    value = parse(value)
                except ValueError:
                    pass
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{label}: expected an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{label}: expected a number, got {value!r}")
        return float(value)
    if kind is str:
        if value is None:
            return ""
        if isinstance(value, bool):  # YAML reads on/off/yes/no unquoted as booleans
            raise ConfigError(f"{label}: expected a string, got {value!r} (quote it in YAML)")
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{label}: expected a string, got {value!r}")
        return str(value)
    if origin is list:
        if isinstance(value, str):
            value = _split_list(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{label}: expected a list, got {value!r}")
        (item,) = typing.get_args(kind) or (Any,)
        return [v if item is Any else _coerce(v, item, f"{label}[{i}]") for i, v in enumerate(value)]
    return value


def settings_from_mapping(cls: type, data: Mapping | None, *, base: Any = None, what: str = "setting",
                          dashed: bool = False, prefix: str = "") -> Any:
    """A `cls` instance: `base` (default: cls's defaults) with the values of `data` coerced to each field's
    annotation; a nested settings dataclass takes a nested mapping. An unknown key is refused, naming the
    closest known keys. `dashed`: keys are spelt with `-` for `_` (Flower's run config)."""
    base = cls() if base is None else base
    fields = {(f.name.replace("_", "-") if dashed else f.name): f for f in dataclasses.fields(cls)}
    data = dict(data or {})
    unknown = [str(k) for k in data if k not in fields]
    if unknown:
        problems = []
        for key in unknown:
            close = difflib.get_close_matches(key, list(fields), n=3, cutoff=0.6)
            close += [name for name in fields if len(key) > 2 and key in name and name not in close]  # lru: lru_size
            close = [prefix + name for name in close[:3]]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            problems.append(f"unknown {what}: {prefix}{key}{hint}")
        raise ConfigError("; ".join(problems))
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        f = fields[key]
        kind, label = hints[f.name], f"{what} {prefix}{key}"
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{label}: expected a mapping, got {value!r}")
            values[f.name] = settings_from_mapping(kind, value, base=getattr(base, f.name), what=what,
                                                   dashed=dashed, prefix=f"{prefix}{key}.")
        else:
            values[f.name] = _coerce(value, kind, label)
    return dataclasses.replace(base, **values)


# Each section: the paper's settings (and the plumbing that runs them) first, then a block of research knobs that go
# beyond the paper (`research(...)`, metadata research=True). Most research knobs are off by default; the TTP
# safeguards (guard, min_pose_signal) are on. `python -m posettp.settings_doc` prints them all.


@dataclass
class ModelConfig:
    variant: str = setting("transformer", "baseline | shared_rotation | shared_keypoint | transformer: which of the "
                                          "paper's models (baseline: supervised only)")
    backbone: str = setting("small", "small | resnet18 | resnet50: the encoder's backbone (small: a CPU-sized "
                                     "stand-in)")
    image_size: int = setting(128, "side of the square input crop in pixels (a multiple of 32)")
    joint_set: str = setting("penn", "penn | h36m | bbc | coco: the joints the supervised head predicts; follows "
                                     "data.dataset unless given")
    num_joints: int = setting(13, "joints the supervised head predicts: the joint set's size, which it follows "
                                  "unless given")
    num_keypoints: int = setting(30, "self-supervised keypoints of the reconstruction task")
    feat_channels: int = setting(256, "channels of the encoder's feature map F")
    heads: int = setting(4, "attention heads of the transformer that relates keypoints and joints")
    ffn: int = setting(1024, "feed-forward width of that transformer")
    dropout: float = setting(0.1, "dropout of that transformer")
    sigma: float = setting(2.0, "Gaussian sigma of the supervised heatmap targets (heatmap pixels)")
    small_width: int = setting(32, "channel width of the small CPU backbone")
    render_width: int = setting(32, "base width of the appearance and keypoint encoders and the renderer")
    pretrained: str = setting("", "local path to ImageNet ResNet weights; empty = random init (logged)")
    # -- research knobs (beyond the paper) --
    render_skip: bool = research(False, "feed the source image into the renderer's last stage as a skip")
    warp_sigma: float = research(0.0, ">0: the skip is the source warped along the keypoint motion, each keypoint "
                                      "moving the pixels within this sigma (heatmap px); needs render_skip")
    kp_beta: float = research(0.0, ">0: standardise each self-supervised heatmap, scale it by kp_beta, then "
                                   "soft-argmax; 0 = the raw logits")
    kp_sigma: float = research(0.0, "sigma of the keypoint Gaussians fed to the renderer; 0 = sigma")
    decode: str = research("quarter", "inference: quarter (the released code's argmax + quarter-pixel shift) | dark "
                                      "(sub-pixel Gaussian fit to the peak, for coarse heatmap grids)")
    flip_test: bool = research(False, "inference: average each crop's heatmaps with its mirror's (twice the "
                                      "inference; a pose that does not depend on which way the person faces)")


@dataclass
class LossConfig:
    lam: float = setting(1e-3, "weight of the self-supervised loss L_self in the joint loss (the paper's lambda)")
    perceptual: str = setting("none", "perceptual term of the reconstruction: vgg16 (needs vgg_weights) | "
                                      "vgg16_random | none")
    vgg_weights: str = setting("", "local path to the VGG-16 weights of perceptual: vgg16")
    pixel_weight: float = setting(1.0, "weight of the pixel MSE term of the reconstruction loss")
    rotation_weight: float = setting(1e-4, "weight of the rotation-prediction loss (shared_rotation variant)")
    running_mean_momentum: float = setting(0.99, "momentum of the running means each reconstruction term is "
                                                 "divided by")
    # -- research knobs (beyond the paper) --
    grad_weight: float = research(0.0, "weight of an L1 loss on image x/y gradients (a cheap stand-in for the "
                                       "perceptual term)")
    motion_focus: float = research(0.0, "0..1: share of the pixel/gradient loss weighted by |target - source|, "
                                        "i.e. where the body moved (label-free)")


@dataclass
class DataConfig:
    url: str = setting("", "shard directory or URL of the dataset")
    dataset: str = setting("synth", "synth | penn | bbc | h36m | posetrack: the dataset's kind (its joint set and "
                                    "metric)")
    train_split: str = setting("train", "split the model trains on")
    val_split: str = setting("val", "split validated on during training")
    test_split: str = setting("test", "split evaluated and personalized on")
    scale_std: float = setting(0.25, "std of the random scale augmentation (relative)")
    rot_std: float = setting(30.0, "std of the random rotation augmentation (degrees)")
    rot_prob: float = setting(0.6, "probability of rotating a training pair")
    flip_prob: float = setting(0.5, "probability of mirroring a training pair")
    num_workers: int = setting(0, "DataLoader worker processes; 0 = load in the training process")
    # -- research knobs (beyond the paper) --
    cross_video: float = research(0.0, "probability that a training pair's source comes from another video of "
                                       "the person, so the reconstruction must explain a change of view")


@dataclass
class TrainConfig:
    max_steps: int = setting(2000, "joint-training steps")
    batch_size: int = setting(32, "training pairs per step and worker")
    lr: float = setting(1e-3, "Adam learning rate of joint training")
    lr_steps: list[float] = setting([0.64, 0.86], "fractions of max_steps at which the lr drops tenfold")
    seed: int = setting(0, "seed of the initial weights and the data order")
    report_every: int = setting(200, "steps between ray.train.report calls (each costs seconds)")
    val_frames: int = setting(256, "validation frames scored at each report; 0 = no validation")
    amp: str = setting("auto", "auto (bf16 where the GPU/CPU has native bf16) | bf16 | off")
    threads: int = setting(0, "torch threads per worker; 0 = torch's default")
    init_from: str = setting("", "start from this checkpoint's weights (a fine-tune: its model settings must be "
                                 "these); empty = random initialisation")


@dataclass
class TTPConfig:
    lr: float = setting(1e-4, "Adam learning rate of the per-person updates")
    steps: int = setting(60, "offline: update steps on the person's frames")
    iters: int = setting(1, "online: updates per incoming frame")
    batch_size: int = setting(8, "frame pairs per update")
    adapt: list[str] = setting(["encoder", "self_head"], "modules adapted at test time (encoder, self_head, "
                                                         "appearance, kp_encoder, renderer)")
    amp: str = setting("auto", "bf16 autocast of the update step: auto (where the CPU/GPU has native bf16) | bf16 "
                               "| off")
    channels_last: bool = setting(True, "NHWC layout for the person's model copy (faster oneDNN convolutions)")
    seed: int = setting(0, "seed of the pair draws and augmentations")
    # -- research knobs (beyond the paper) --
    reset_every: int = research(0, "online: reset to the base weights every N frames; 0 = never")
    guard: bool = research(True, "on by default: roll back to the last good weights when the probe's "
                                 "self-supervised loss diverges or its confidence drops")
    guard_ratio: float = research(1.5, "guard: self-supervised loss above this ratio of its value before "
                                       "adapting = divergence")
    guard_window: int = research(5, "guard: updates between checks of the probe batch")
    guard_confidence: float = research(1.0, "guard: also roll back when the supervised heatmaps' mean peak falls "
                                            "below this ratio of the base model's; 0 = off")
    min_pose_signal: float = research(1.02, "on by default: adapt only if swapping keypoints between probe frames "
                                            "raises the base model's loss by this ratio; 0 = off")
    signal_frames: int = research(16, "online: frames seen before the pose-signal check (no update until then)")
    cross_video: float = research(0.0, "probability that a TTP pair's source comes from another (earlier) video")
    drift_steps: float = research(0.0, "trust region: no adapted weight moves more than drift_steps * lr from its "
                                       "base value; 0 = unbounded")
    flip_weight: float = research(0.0, "weight of the supervised heatmaps' agreement with their mirror image in "
                                       "the TTP loss; 0 = off")
    pseudo_label_weight: float = research(0.0, "weight of self-training toward the flip test's sharp, detached "
                                               "prediction in the TTP loss; 0 = off")
    pseudo_label_agreement: float = research(0.0, "pseudo-labels only for joints whose two views decode at most "
                                                  "this many heatmap px apart; 0 = every joint")
    recon_weight: float = research(1.0, "weight of the paper's reconstruction loss in the TTP loss; 0 drops it "
                                        "(another term must then be on)")
    teacher_weight: float = research(0.0, "weight of self-training toward a weight-averaged teacher's prediction "
                                          "averaged over augmentations (CoTTA's pseudo-label); 0 = off")
    teacher_momentum: float = research(0.99, "the teacher's exponential moving average of the adapted weights, "
                                             "per update")
    restore: float = research(0.0, "share of the adapted weights restored to the base after each update, drawn "
                                   "at random (CoTTA's stochastic restore); 0 = off")
    delta_rank: int = research(0, "low-rank TTP: each adapted weight's change is kept at this rank (a smaller "
                                   "delta, stored as two factors); 0 = dense")
    norm_and_bias_only: bool = research(False, "TTP adapts only the norm affines and biases of the adapted modules "
                                               "(a delta of a few thousand numbers)")
    temporal_agreement: float = research(0.0, "online, with the teacher: pseudo-labels only for joints whose "
                                              "teacher prediction moved at most this many heatmap px since the "
                                              "previous frame of the video; 0 = every joint")

    @property
    def drift_radius(self) -> float:
        """How far (absolute) TTP may move any adapted weight from its base value; inf without a trust region.
        Also what the Flower server holds honest clients' deltas to (`server.fl.make_store`)."""
        return self.drift_steps * self.lr if self.drift_steps > 0 else float("inf")


@dataclass
class Config:
    name: str = setting("posettp", "the run's name (training's default run directory, `posettp info`)")
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
INFERENCE_ONLY = ("decode", "flip_test")  # model settings that change predictions, not the weights


def model_differences(ours: ModelConfig, theirs: Mapping) -> list[str]:
    """The model settings (as `model.KEY`) in which a checkpoint's resolved model config (`theirs`) differs from
    ours where the weights depend on them: not the inference-only ones, not where the backbone's initial weights
    were read from."""
    return [f"model.{k}" for k, v in dataclasses.asdict(ours).items()
            if k not in INFERENCE_ONLY + ("pretrained",) and theirs.get(k) != v]

BACKBONES = ("small", "resnet18", "resnet50")
AMP_MODES = ("auto", "bf16", "off")
DECODINGS = ("quarter", "dark")  # model.heatmaps.DECODERS


CONFIG_KEY = "config key"

# Keys that are no longer settings. A resolved config written before one went (a checkpoint's config.json) still
# loads; a YAML file or `--set` that names one is told why.
RETIRED = {"ttp.optimizer": "TTP always uses Adam"}


def _without_retired(data: Mapping | None, refuse: bool) -> dict:
    data = dict(data or {})
    for key, why in RETIRED.items():
        section, leaf = key.split(".")
        values = data.get(section)
        if isinstance(values, Mapping) and leaf in values:
            if refuse:
                raise ConfigError(f"{key} is no longer a setting ({why}): remove it")
            data[section] = {k: v for k, v in values.items() if k != leaf}
    return data


def _assign(target: Any, new: Any) -> None:
    """Copy `new`'s values into `target` in place, section by section (callers may hold cfg.model etc.)."""
    for f in dataclasses.fields(target):
        current, value = getattr(target, f.name), getattr(new, f.name)
        if dataclasses.is_dataclass(current) and current is not value:
            _assign(current, value)
        else:
            setattr(target, f.name, value)


def _update(cfg: Config, data: Mapping, refuse_retired: bool = True) -> None:
    data = _without_retired(data, refuse=refuse_retired)
    new = settings_from_mapping(Config, data, base=cfg, what=CONFIG_KEY)
    _follow_dataset(new, data)
    _assign(cfg, new)


def _follow_dataset(cfg: Config, data: Mapping) -> None:
    """model.joint_set follows data.dataset, and model.num_joints the joint set, unless `data` gives them."""
    given = data.get("model") if isinstance(data.get("model"), Mapping) else {}
    dataset = data.get("data", {}).get("dataset") if isinstance(data.get("data"), Mapping) else None
    if dataset is not None and "joint_set" not in given and cfg.data.dataset in DATASET_JOINT_SETS:
        cfg.model.joint_set = DATASET_JOINT_SETS[cfg.data.dataset]
    if (dataset is not None or "joint_set" in given) and "num_joints" not in given \
            and cfg.model.joint_set in JOINT_SETS:
        cfg.model.num_joints = JOINT_SETS[cfg.model.joint_set].size


def _dotted(key: str, value: Any) -> dict:
    """`a.b`, v -> {"a": {"b": v}}."""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def _validate(cfg: Config) -> None:
    if cfg.model.variant not in VARIANTS:
        raise ConfigError(f"model.variant must be one of {VARIANTS}, got {cfg.model.variant!r}")
    if cfg.model.backbone not in BACKBONES:
        raise ConfigError(f"model.backbone must be one of {BACKBONES}, got {cfg.model.backbone!r}")
    if cfg.model.image_size % 32:
        raise ConfigError(f"model.image_size must be a multiple of 32, got {cfg.model.image_size}")
    if cfg.model.decode not in DECODINGS:
        raise ConfigError(f"model.decode must be one of {DECODINGS}, got {cfg.model.decode!r}")
    if cfg.data.dataset not in DATASET_JOINT_SETS:
        raise ConfigError(f"data.dataset must be one of {tuple(DATASET_JOINT_SETS)}, got {cfg.data.dataset!r}")
    if cfg.model.joint_set not in JOINT_SETS:
        raise ConfigError(f"model.joint_set must be one of {tuple(JOINT_SETS)}, got {cfg.model.joint_set!r}")
    if cfg.model.joint_set != DATASET_JOINT_SETS[cfg.data.dataset]:
        raise ConfigError(f"model.joint_set is {cfg.model.joint_set} but data.dataset {cfg.data.dataset} has the "
                          f"{DATASET_JOINT_SETS[cfg.data.dataset]} joint set")
    if cfg.model.num_joints != JOINT_SETS[cfg.model.joint_set].size:
        raise ConfigError(f"model.num_joints is {cfg.model.num_joints} but the {cfg.model.joint_set} joint set has "
                          f"{JOINT_SETS[cfg.model.joint_set].size} joints")
    for key in ("flip_weight", "pseudo_label_weight", "pseudo_label_agreement", "recon_weight", "teacher_weight",
                "temporal_agreement"):
        if getattr(cfg.ttp, key) < 0:
            raise ConfigError(f"ttp.{key} must be >= 0 (0 = off), got {getattr(cfg.ttp, key)}")
    for key in ("teacher_momentum", "restore"):
        if not 0 <= getattr(cfg.ttp, key) < 1:
            raise ConfigError(f"ttp.{key} must be in [0, 1), got {getattr(cfg.ttp, key)}")
    if not (cfg.ttp.recon_weight or cfg.ttp.teacher_weight or cfg.ttp.pseudo_label_weight or cfg.ttp.flip_weight):
        raise ConfigError("ttp.recon_weight is 0 and no other TTP term is on: the update would have no loss")
    if cfg.ttp.delta_rank < 0:
        raise ConfigError(f"ttp.delta_rank must be >= 0 (0 = dense), got {cfg.ttp.delta_rank}")
    if cfg.ttp.delta_rank and cfg.ttp.norm_and_bias_only:
        raise ConfigError("ttp.delta_rank and ttp.norm_and_bias_only are two ways to a small delta: choose one")
    if cfg.ttp.temporal_agreement and not cfg.ttp.teacher_weight:
        raise ConfigError("ttp.temporal_agreement gates the teacher's pseudo-labels (ttp.teacher_weight), which is "
                          "0: set both")
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
    """A Config from a resolved mapping (a checkpoint's `config`): retired keys are dropped, not refused."""
    cfg = Config()
    _update(cfg, data, refuse_retired=False)
    _validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults) and apply `dotted.key=value` overrides."""
    data: dict = {}
    if path:
        data = yaml.safe_load(config_path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    cfg = Config()
    _update(cfg, data)
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: Config, overrides: list[str] | None) -> Config:
    """Apply `dotted.key=value` strings in place (and validate); returns cfg."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects dotted.key=value, got {item!r}")
        key, value = item.split("=", 1)
        _update(cfg, _dotted(key.strip(), value))
    _validate(cfg)
    return cfg
