"""Checkpoints: a directory with `model.safetensors` + `config.json`; identity = sha256 of the weights.

No pickles anywhere: weights are safetensors, everything else is JSON. Loading
refuses weights that do not fit the stored config, naming what differs.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from . import io
from .config import Config, from_dict
from .joints import JointSet, joint_set
from .network import PoseTTPNet, build_model

WEIGHTS = "model.safetensors"
META = "config.json"


class CheckpointError(ValueError):
    pass


@dataclass
class Checkpoint:
    model: PoseTTPNet
    config: Config
    meta: dict = field(default_factory=dict)
    sha256: str = ""
    loss_buffers: dict = field(default_factory=dict)

    @property
    def joint_set(self) -> JointSet:
        """The joints this model predicts, as its config names them."""
        return joint_set(self.config.model.joint_set)


def state_bytes(model: PoseTTPNet) -> bytes:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return st_save(state)


def save_checkpoint(url: str, model: PoseTTPNet, cfg: Config, step: int = 0, metrics: dict | None = None,
                    loss_module: torch.nn.Module | None = None, extra: dict | None = None) -> str:
    """Write the checkpoint directory; returns the sha256 of its weights."""
    weights = state_bytes(model)
    sha = hashlib.sha256(weights).hexdigest()
    meta = {
        "format": "posettp-checkpoint", "format_version": 1, "variant": cfg.model.variant,
        "step": int(step), "metrics": metrics or {}, "sha256": sha, "created_at": time.time(),
        "config": cfg.to_dict(), "joint_set": joint_set(cfg.model.joint_set).to_dict(),
        "loss_buffers": {k: v.tolist() for k, v in (loss_module.state_dict().items() if loss_module else [])
                         if not k.startswith("vgg.") and k not in ("vgg_mean", "vgg_std")},
        **(extra or {}),
    }
    io.write_bytes_atomic(io.join(url, WEIGHTS), weights)
    io.write_bytes_atomic(io.join(url, META), json.dumps(meta, indent=2, default=float).encode())
    return sha


def checkpoint_url(url: str) -> str:
    """A checkpoint directory as given, or the final checkpoint a training run directory's `latest.json` names, so
    that a run directory works wherever a checkpoint does."""
    latest = io.join(url, "latest.json")
    if io.exists(io.join(url, WEIGHTS)) or not io.exists(latest):
        return url
    try:
        named = json.loads(io.read_bytes(latest)).get("checkpoint")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise CheckpointError(f"{latest}: not a run's latest.json ({exc})") from exc
    if not isinstance(named, str):
        raise CheckpointError(f"{latest} names no checkpoint")
    return named


def load_checkpoint(url: str, map_location: str = "cpu", overrides: Config | None = None) -> Checkpoint:
    url = checkpoint_url(url)
    try:
        meta = json.loads(io.read_bytes(io.join(url, META)))
        weights = io.read_bytes(io.join(url, WEIGHTS))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{url}: not a checkpoint directory (needs {WEIGHTS} and {META})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{url}: {META} is not JSON ({exc})") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{url}: {META} holds no config")
    cfg = overrides or from_dict(meta["config"])
    model = build_model(cfg.model)
    try:
        state = st_load(weights)
    except SafetensorError as exc:
        raise CheckpointError(f"{url}: {WEIGHTS} is corrupt or truncated ({exc})") from exc
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{url}: weights do not match config (variant={cfg.model.variant}, backbone={cfg.model.backbone}): "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
            f"{'...' if len(unexpected) > 3 else ''}, shape mismatch {wrong[:3]}")
    model.load_state_dict(state)
    model.to(map_location)
    return Checkpoint(model=model, config=cfg, meta=meta, sha256=hashlib.sha256(weights).hexdigest(),
                      loss_buffers=meta.get("loss_buffers", {}))


def restore_loss_buffers(loss_module: torch.nn.Module, buffers: dict) -> None:
    state = loss_module.state_dict()
    for k, v in buffers.items():
        if k in state and torch.tensor(v).shape == state[k].shape:
            state[k].copy_(torch.tensor(v, dtype=state[k].dtype))


def checkpoint_sha256(url: str) -> str:
    return hashlib.sha256(io.read_bytes(io.join(url, WEIGHTS))).hexdigest()
