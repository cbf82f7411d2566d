"""The TTP step the product runs (model/personalize.py) vs a straightforward reference step.

The reference is what a first implementation does: autograd through every
weight, the full network forward (Transformer head included), the appearance
code and the perceptual targets with a graph. Both update exactly the same
parameters with Adam, so their results match; only the cost differs.

Run: .venv/bin/python -m bench.ttp_step
"""
from __future__ import annotations

import json

import torch

from model.config import load_config
from model.network import build_model
from model.personalize import _Adapter, adaptable_parameters
from training.loop import build_recon_loss

from .common import machine, median_ms


class ReferenceStep:
    """Straightforward TTP step: requires_grad everywhere, full forward, no graph pruning."""

    def __init__(self, model, recon_loss, cfg):
        self.model = model.eval()
        self.model.requires_grad_(True)
        self.recon_loss = recon_loss
        self.optimizer = torch.optim.Adam([p for _, p in adaptable_parameters(model, cfg.adapt)], lr=cfg.lr)

    def __call__(self, target, source):
        self.optimizer.zero_grad()
        out = self.model(target, source)
        terms = [torch.nn.functional.mse_loss(out["recon"], target)]
        if self.recon_loss.vgg is not None:
            terms += [torch.nn.functional.mse_loss(a, b) for a, b in
                      zip(self.recon_loss._vgg_feats(out["recon"]), self.recon_loss._vgg_feats(target))]
        if self.recon_loss.cfg.grad_weight:
            from model.losses import image_gradient_l1

            terms.append(self.recon_loss.cfg.grad_weight * image_gradient_l1(out["recon"], target))
        loss = (torch.stack(terms) / self.recon_loss.running_means).sum()
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


def compare(config: str, overrides: list[str], batches=(1, 8, 32), repeats: int = 5) -> dict:
    cfg = load_config(config, overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    recon = build_recon_loss(model, cfg).eval()
    s = cfg.model.image_size
    out = {}
    for b in batches:
        target, source = torch.rand(b, 3, s, s), torch.rand(b, 3, s, s)
        ref = ReferenceStep(build_model(cfg.model).eval(), recon, cfg.ttp)
        ref.model.load_state_dict(model.state_dict())
        fast = _Adapter(model, recon, cfg.ttp)
        # same parameters, same data: the first step's losses must agree
        assert abs(ref(target, source) - fast.step(target, source)) < 1e-4
        out[b] = {"reference_ms": median_ms(lambda: ref(target, source), repeats),
                  "fast_ms": median_ms(lambda: fast.step(target, source), repeats)}
        out[b]["speedup"] = out[b]["reference_ms"] / out[b]["fast_ms"]
    return out


def run(include_paper: bool = True) -> dict:
    res = {"machine": machine(), "synth_small": compare("configs/synth_small.yaml", [])}
    if include_paper:
        res["paper_resnet18"] = compare("configs/synth_paper.yaml", [], batches=(1, 8), repeats=3)
    small8 = res["synth_small"][8]
    res.update(ttp_step_ms_reference=small8["reference_ms"], ttp_step_ms_fast=small8["fast_ms"],
               ttp_step_speedup=small8["speedup"])
    return res


if __name__ == "__main__":
    print(json.dumps(run(), indent=2, default=lambda x: round(x, 3)))
