"""Joint training in plain PyTorch on this process: for experiments (reproduce) and as Ray's reference."""
from __future__ import annotations

import time

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from model.config import Config
from model.network import PoseTTPNet, build_model

from .data import labeled
from .loop import build_recon_loss, make_optimizer, seed_everything, to_training_layout, train_step


def infinite_batches(frames: list, cfg: Config, seed: int, pin_memory: bool = False):
    from data.pairs import PairDataset

    dataset = PairDataset(labeled(frames), cfg.model.image_size, cfg.data, seed=seed, augment=True)
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True,
                        num_workers=cfg.data.num_workers, generator=torch.Generator().manual_seed(seed),
                        pin_memory=pin_memory)
    while True:
        yield from loader


def train_local(cfg: Config, train_frames: list, progress: bool = True, desc: str = "train",
                device: torch.device | None = None):
    """Returns (model, recon_loss, history) after cfg.train.max_steps steps, on `device` (default CPU).

    The weights are initialised on the CPU whatever the device, so a seed gives the same initial model on a GPU.
    """
    device = device or torch.device("cpu")
    seed_everything(cfg.train.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    model: PoseTTPNet = to_training_layout(build_model(cfg.model).to(device))
    recon_loss = build_recon_loss(model, cfg)
    if recon_loss is not None:
        recon_loss.to(device)
    optimizer = make_optimizer(model, cfg)
    model.train()
    history = []
    batches = infinite_batches(train_frames, cfg, cfg.train.seed, pin_memory=device.type == "cuda")
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
