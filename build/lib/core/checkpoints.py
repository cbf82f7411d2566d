"""A checkpoint's model with its reconstruction loss, ready to predict or personalize.

TTP needs the loss's running means from training (they scale the reconstruction terms), so the model and its
loss are always loaded together; training builds the loss with the same function.
"""
from __future__ import annotations

import torch

from model.checkpoint import Checkpoint, restore_loss_buffers
from model.config import Config
from model.losses import ReconstructionLoss
from model.network import PoseTTPNet


def build_recon_loss(model: PoseTTPNet, cfg: Config) -> ReconstructionLoss | None:
    """The reconstruction loss of a model that has the self-supervised task (None for the baseline)."""
    return ReconstructionLoss(cfg.loss) if model.has_reconstruction else None


def model_with_loss(ck: Checkpoint, device: torch.device | None = None):
    """The checkpoint's model in eval mode and its reconstruction loss with the trained running means, both moved
    to `device` when given (the checkpoint's model is that same module)."""
    recon = build_recon_loss(ck.model, ck.config)
    if recon is not None:
        restore_loss_buffers(recon, ck.loss_buffers)
        recon.eval()
    if device is not None:
        ck.model.to(device)
        recon = recon.to(device) if recon is not None else None
    return ck.model.eval(), recon


def with_weights(model: PoseTTPNet, state: dict[str, torch.Tensor]) -> PoseTTPNet:
    """A new model of the same architecture and device holding `state` (a person's weights), in eval mode."""
    tuned = type(model)(model.cfg).to(next(model.parameters()).device)
    tuned.load_state_dict(state)
    return tuned.eval()
