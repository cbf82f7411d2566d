"""The TTP step the product runs (model/personalize.py) vs a straightforward reference step.

The reference is what a first implementation does: autograd through every
weight, the full network forward (Transformer head included), the 30 keypoint
maps built at full size and run through the keypoint encoder's 7x7 convolution,
the appearance code and the perceptual targets with a graph, fp32, contiguous layout. Both
update exactly the same parameters with Adam from the same weights; the first
step's losses must agree (to 1e-4 in fp32, 1 % under bf16), and `bench.run`
checks that the product step's PCK matches an fp32 step's on real persons.

torch.compile (inductor, CPU) was tried and is not used: 41 s to compile the loss
for each person's model copy, then 90 ms per batch-8 step vs 98 ms eager and 75 ms
eager channels-last (synth_small, this 2-core CPU).

Run: .venv/bin/python -m bench.ttp_step
"""
from __future__ import annotations

import json
from dataclasses import replace

import torch

from core.checkpoints import build_recon_loss
from model.config import load_config
from model.network import build_model
from model.personalize import _Adapter, adaptable_parameters
from model.precision import use_bf16

from .common import machine, median_ms


class ReferenceStep:
    """Straightforward TTP step: requires_grad everywhere, full forward, no graph pruning."""

    def __init__(self, model, recon_loss, cfg):
        self.model = model.eval()
        self.model.requires_grad_(True)
        self.recon_loss = recon_loss
        self.optimizer = torch.optim.Adam([p for _, p in adaptable_parameters(model, cfg.adapt)], lr=cfg.lr)

    def reconstruct(self, target, source):
        """The model's forward with the keypoint maps materialised (`ConvEncoder.forward_rank1` avoids them)."""
        coords, (gx, gy) = self.model.keypoint_gaussians(self.model.pose(target)["h_self"])
        maps = gy[..., :, None] * gx[..., None, :]
        code = torch.cat([self.model.appearance(source), self.model.kp_encoder(maps)], dim=1)
        return self.model.renderer(code, self.model.skip_image(source, coords))

    def __call__(self, target, source):
        self.optimizer.zero_grad()
        recon = self.reconstruct(target, source)
        weights = self.recon_loss.pixel_weights(target, source)
        terms = [torch.nn.functional.mse_loss(recon, target) if weights is None
                 else ((recon - target) ** 2 * weights).mean()]
        if self.recon_loss.vgg is not None:
            terms += [torch.nn.functional.mse_loss(a, b) for a, b in
                      zip(self.recon_loss._vgg_feats(recon), self.recon_loss._vgg_feats(target))]
        if self.recon_loss.cfg.grad_weight:
            from model.losses import image_gradient_l1

            terms.append(self.recon_loss.cfg.grad_weight * image_gradient_l1(recon, target, weights))
        loss = (torch.stack(terms) / self.recon_loss.running_means).sum()
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


def compare(config: str, overrides: list[str], batches=(1, 8, 32), repeats: int = 5) -> dict:
    """Reference vs the product step, and the product step's parts one at a time (same weights, same data)."""
    cfg = load_config(config, overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    recon = build_recon_loss(model, cfg).eval()
    s = cfg.model.image_size
    steps = {"pruned_ms": replace(cfg.ttp, amp="off", channels_last=False),  # graph pruning only
             "pruned_channels_last_ms": replace(cfg.ttp, amp="off"),
             "fast_ms": cfg.ttp}  # what personalize() runs: pruning, channels-last, amp "auto"
    out = {}
    for b in batches:
        target, source = torch.rand(b, 3, s, s), torch.rand(b, 3, s, s)
        ref = ReferenceStep(build_model(cfg.model).eval(), recon, cfg.ttp)
        ref.model.load_state_dict(model.state_dict())
        reference_loss = ref(target, source)
        row = {"reference_ms": median_ms(lambda: ref(target, source), repeats),
               "bf16": use_bf16(torch.device("cpu"), cfg.ttp.amp)}
        for name, ttp in steps.items():
            adapter = _Adapter(model, recon, ttp)
            # same parameters, same data: the first step's loss must agree (bf16 to 1 %)
            tolerance = 1e-2 * reference_loss if use_bf16(torch.device("cpu"), ttp.amp) else 1e-4
            assert abs(adapter.step(target, source) - reference_loss) < tolerance, name
            row[name] = median_ms(lambda a=adapter: a.step(target, source), repeats)
        row["speedup"] = row["reference_ms"] / row["fast_ms"]
        out[b] = row
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
