"""Joint training in plain PyTorch on this process: for experiments (reproduce) and as Ray's reference."""
from __future__ import annotations

import time

import torch
from tqdm import tqdm

from model.config import Config

from .data import batch_stream, labeled
from .loop import build_training, train_step


def train_local(cfg: Config, train_frames: list, progress: bool = True, desc: str = "train",
                device: torch.device | None = None):
    """Returns (model, recon_loss, history) after cfg.train.max_steps steps, on `device` (default CPU).

    Setup, batches and step are a Ray worker's (rank 0 of 1), so a local run trains what `posettp train`
    trains, and a seed gives the same initial model on a GPU.
    """
    device = device or torch.device("cpu")
    model, recon_loss, optimizer = build_training(cfg, device)
    history = []
    batches = batch_stream(labeled(train_frames), cfg, rank=0, start_step=0, pin_memory=device.type == "cuda")
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.train.max_steps), desc=desc, disable=not progress, mininterval=5)
    for step in bar:
        terms = train_step(model, recon_loss, optimizer, next(batches), step, cfg)
        if step % 50 == 0 or step == cfg.train.max_steps - 1:
            terms["step"] = step
            terms["img_per_s"] = (step + 1) * cfg.train.batch_size / (time.perf_counter() - t0)
            history.append(terms)
            bar.set_postfix(l_sup=f"{terms['l_sup']:.4f}", l_self=f"{terms['l_self']:.3f}")
    model.eval()
    return model, recon_loss, history
