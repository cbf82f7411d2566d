"""Test-time personalization (paper §3.3): adapt the encoder and self-supervised head of one
person's copy of the model on that person's unlabeled frames, then predict.

- offline: N steps on random pairs from the person's whole set, then predict every frame;
- online: stream in order; at frame t, `iters` updates on pairs (target t, source < t,
  same video), then predict frame t -- the future is never looked at.

Every person starts from the base weights and a fresh optimizer. The model runs in
eval mode (norm layers keep their training statistics); norm affines, the
Transformer/supervised head and whatever is not in `cfg.adapt` stay frozen.
The update step only builds the graph it needs (frozen parts carry no weight
gradients, the source's appearance code is computed without a graph) and runs the
person's copy channels-last with bf16 autocast where the hardware has native bf16
(`ttp.channels_last`, `ttp.amp`; measured in `bench/ttp_step.py`).

Beyond the paper, `flip_weight` (0 = off, the paper's loss) adds to the reconstruction loss the supervised heatmaps'
agreement with their mirror image (`objectives.flip_consistency`): steady sideways joint offsets, which the
reconstruction hardly sees, show there (a sideways offset a joint shares with its left/right partner shows as twice
itself); `pseudo_label_weight` (0 = off) adds self-training toward the flip test's sharp, detached prediction
(`objectives.mirror_pseudo_labels`), which lower, flatter maps cannot satisfy (on synthetic persons TTP then gains
+3.6 PCK offline, +2.7 online), only for the joints whose two views agree within `pseudo_label_agreement` heatmap
pixels when that is set (0.5 px halved the validation persons losing more than a point).

`teacher_weight` (0 = off) is CoTTA's recipe: the pseudo-label is a weight-averaged teacher's (an exponential moving
average of the adapted weights, `teacher_momentum`) prediction averaged over scaled, rotated and mirrored views
(`predict.augmented_heatmaps`); `restore` returns that share of the adapted weights, drawn at random, to the base
after each update; online, `temporal_agreement` keeps the joints whose teacher prediction moved little since the
previous frame. `recon_weight` 0 drops the paper's reconstruction from the loss.

Label-free safeguards (beyond the paper), two on by default:
- the pose-signal check: before adapting, swap the keypoints between the frames of a
  probe batch; if the base model's reconstruction loss hardly rises (< `min_pose_signal`),
  the loss does not depend on where the keypoints are, its gradient carries no pose
  information, and adapting can only drift -- so this person keeps the base weights;
- the collapse guard watches a probe batch (offline: fixed; online: drawn from the frames seen
  so far and redrawn each time the stream doubles) and rolls back to the last good weights
  when the self-supervised loss rises above `guard_ratio` times its value before
  adaptation, or when the supervised heatmaps' mean peak falls below `guard_confidence`
  times the base model's (measured on synthetic persons: every person whose PCK fell
  under TTP had lost heatmap confidence, the ones that gained had not).
Both count as guard events. A third (`drift_steps`; 0 = off, the paper's TTP) is a trust region: every adapted
weight stays within `drift_steps * lr` of its base value (about as far as that many Adam steps move it), however many
updates run. On synthetic persons 20 lr keeps four updates per frame from losing, for 8–15 % of the gain.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .augment import Augmentation
from .config import TTPConfig
from .heatmaps import DECODERS
from .losses import ReconstructionLoss
from .network import PoseTTPNet
from .objectives import flip_consistency, mirror_pseudo_labels, pose_signal, self_loss, sharp_pseudo_labels
from .precision import autocast
from .predict import augmented_heatmaps, mirrored_heatmaps, predict_crops
from .joints import joint_set

NORM_TYPES = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)


@dataclass
class TTPResult:
    predictions: np.ndarray  # (N, J, 3) [x, y, score] in original pixels, input order
    state: dict[str, torch.Tensor]  # the personalized weights
    metrics: dict = field(default_factory=dict)


def adaptable_parameters(model: PoseTTPNet, adapt: list[str],
                         norm_and_bias_only: bool = False) -> list[tuple[str, nn.Parameter]]:
    """Parameters of the adapted submodules, norm affines excluded; with `norm_and_bias_only`, the norm affines and
    the biases alone."""
    norms = {f"{mname}.{pname}" for mname, m in model.named_modules() if isinstance(m, NORM_TYPES)
             for pname, _ in m.named_parameters(recurse=False)}
    return [(n, p) for n, p in model.named_parameters() if n.split(".")[0] in adapt and
            ((n in norms or n.endswith(".bias")) if norm_and_bias_only else n not in norms)]


def shared_augment(target: torch.Tensor, source: torch.Tensor, gen: torch.Generator,
                   augment: Augmentation = Augmentation()) -> tuple[torch.Tensor, torch.Tensor]:
    """One random rotation/scale per pair, applied identically to target and source.

    The draws come from the same parameters as the joint-training pairs (`Augmentation.from_data(cfg.data)`), so a
    model is adapted under the augmentation it was trained with.
    """
    b = target.shape[0]
    scale, rot = augment.draw_batch(b, gen)
    a = torch.deg2rad(rot)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(a) * scale, -torch.sin(a) * scale
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(a) * scale, torch.cos(a) * scale
    grid = F.affine_grid(theta.to(target), list(target.shape), align_corners=False)
    warp = lambda x: F.grid_sample(x, grid, align_corners=False)  # noqa: E731
    return warp(target), warp(source)


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold each Conv2d + BatchNorm2d pair inside Sequentials into one Conv2d, in place.

    Exact for frozen, eval-mode layers; it saves the norm's forward and backward in every TTP step.
    """
    for name, child in module.named_children():
        if isinstance(child, nn.Sequential):
            layers = list(child)
            for i in range(len(layers) - 1):
                if isinstance(layers[i], nn.Conv2d) and isinstance(layers[i + 1], nn.BatchNorm2d):
                    layers[i], layers[i + 1] = fuse_conv_bn_eval(layers[i], layers[i + 1]), nn.Identity()
            setattr(module, name, nn.Sequential(*layers))
        fold_batchnorm(getattr(module, name))
    return module


class _Adapter:
    """One person's model copy, its optimizer, and the guard's bookkeeping."""

    def __init__(self, base: PoseTTPNet, recon_loss: ReconstructionLoss | None, cfg: TTPConfig, seed: int = 0):
        self.base = copy.deepcopy(base).eval().requires_grad_(False)
        self.base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
        self.model = copy.deepcopy(base).eval().requires_grad_(False)
        # torch 2.13 on the CPU crashes (SIGSEGV) in GroupNorm's channels-last backward when its input carries no
        # gradient, which adapting only norm affines and biases makes happen behind the first frozen convolution
        channels_last = cfg.channels_last and not cfg.norm_and_bias_only
        self.layout = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(memory_format=self.layout)
        self.base.to(memory_format=self.layout)
        # what the loss runs: the adapted model's modules with the frozen reconstruction modules folded (the
        # base, used only by the probes, is folded alike so that the guard compares like with like)
        self.loss_model = copy.copy(self.model)
        self.loss_model._modules = dict(self.model._modules)
        for name in ("kp_encoder", "appearance", "renderer"):
            if name in self.model._modules and name not in cfg.adapt:
                self.loss_model._modules[name] = fold_batchnorm(copy.deepcopy(self.model._modules[name]))
                self.base._modules[name] = fold_batchnorm(self.base._modules[name])
        self.device = next(base.parameters()).device
        adapted = adaptable_parameters(self.model, cfg.adapt, cfg.norm_and_bias_only)
        self.params = [p for _, p in adapted]
        for p in self.params:
            p.requires_grad_(True)
        self.anchors = [self.base_state[n] for n, _ in adapted]  # the base values the trust region is around
        self.recon_loss = recon_loss
        self.cfg = cfg
        self.frozen_appearance = "appearance" not in cfg.adapt
        self.mirror_terms = bool(cfg.flip_weight or cfg.pseudo_label_weight)
        self.flip_perm = joint_set(base.cfg.joint_set).flip_permutation() \
            if self.mirror_terms or cfg.teacher_weight else None
        self.teacher = copy.deepcopy(self.model) if cfg.teacher_weight else None
        self.teacher_params = [dict(self.teacher.named_parameters())[n] for n, _ in adapted] if self.teacher else []
        self.restores = torch.Generator().manual_seed(seed + 104729)  # the stochastic restore's draws
        self.seed = seed
        self.rotations = torch.Generator().manual_seed(seed)  # the update steps' draws (rotation variant)
        self.guard_events = 0
        self.safeguards: list[dict] = []  # each event: which safeguard, after how many updates, the measured reason
        self.updates = 0
        self.pose_signal: float | None = None
        self.stopped = False
        self.good_state: dict[str, torch.Tensor] | None = None
        self.probe_batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.reference: tuple[float, float] = (math.nan, math.nan)  # the base model's measures on probe_batch
        self.reset()

    def standard_layout(self) -> PoseTTPNet:
        """The adapted model in the standard layout: its predictions are then bit-identical to base + delta
        (channels-last convolutions round differently, by about 1e-7)."""
        return self.model.to(memory_format=torch.contiguous_format)

    def reset(self) -> None:
        self.model.load_state_dict(self.base_state)
        if self.teacher is not None:
            self.teacher.load_state_dict(self.base_state)
        self.optimizer = torch.optim.Adam(self.params, lr=self.cfg.lr)
        self.good_state = None

    def teacher_labels(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's view-averaged prediction of `images`, as heatmap coordinates (B, J, 2)."""
        return DECODERS[self.teacher.cfg.decode](augmented_heatmaps(self.teacher, images, self.flip_perm))[0]

    def loss(self, target: torch.Tensor, source: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """The TTP loss of one batch of pairs; `keep` (J,) masks the teacher's pseudo-labels (temporal gate)."""
        out = self.loss_model.pose(target) if self.mirror_terms or self.teacher is not None else {}
        loss = out["h_sup"].new_zeros(()) if out else target.new_zeros(())
        if self.cfg.recon_weight:
            recon, _ = self_loss(self.loss_model, self.recon_loss, target, source, h_self=out.get("h_self"),
                                 frozen_appearance=self.frozen_appearance, update_means=False,
                                 rotations=self.rotations)
            loss = loss + self.cfg.recon_weight * recon
        if self.teacher is not None:
            loss = loss + self.cfg.teacher_weight * sharp_pseudo_labels(out["h_sup"], self.teacher_labels(target),
                                                                        self.loss_model.cfg.sigma, keep)
        if self.mirror_terms:
            h_sup, mirrored = out["h_sup"], mirrored_heatmaps(self.loss_model, target, self.flip_perm)
            if self.cfg.flip_weight:
                loss = loss + self.cfg.flip_weight * flip_consistency(h_sup, mirrored)
            if self.cfg.pseudo_label_weight:
                model_cfg = self.loss_model.cfg
                loss = loss + self.cfg.pseudo_label_weight * mirror_pseudo_labels(
                    h_sup, mirrored, model_cfg.sigma, DECODERS[model_cfg.decode], self.cfg.pseudo_label_agreement)
        return loss

    def step(self, target: torch.Tensor, source: torch.Tensor, keep: torch.Tensor | None = None) -> float:
        if self.stopped:
            return float("nan")
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.cfg.amp):
            loss = self.loss(*self._laid_out((target, source)), keep=keep)
        if not torch.isfinite(loss):
            self._rollback("collapse guard", f"the self-supervised loss is {float(loss)}")
            return float("nan")
        loss.backward()
        self.optimizer.step()
        self.updates += 1
        if self.cfg.restore:
            self._restore()
        if self.cfg.drift_steps:
            self._project()
        if self.cfg.delta_rank:
            self._low_rank()
        if self.teacher is not None:
            self._average()
        return float(loss.detach())

    @torch.no_grad()
    def _low_rank(self) -> None:
        """Keep each adapted weight's change from the base at rank `delta_rank` (its best approximation of that
        rank), scaled back into the trust region where that leaves it: the delta is then two small factors."""
        rank, radius = self.cfg.delta_rank, self.cfg.drift_radius
        for p, anchor in zip(self.params, self.anchors):
            if p.ndim < 2:
                continue
            change = (p - anchor).reshape(p.shape[0], -1).float()
            u, s, vh = torch.linalg.svd(change, full_matrices=False)
            change = (u[:, :rank] * s[:rank]) @ vh[:rank]
            largest = float(change.abs().max())
            if largest > radius:
                change = change * (radius / largest)
            p.copy_(anchor + change.reshape(p.shape).to(p.dtype))

    @torch.no_grad()
    def _restore(self) -> None:
        """Return a random `restore` share of the adapted weights to their base values."""
        for p, anchor in zip(self.params, self.anchors):
            back = torch.rand(p.shape, generator=self.restores) < self.cfg.restore
            p[back.to(p.device)] = anchor[back.to(anchor.device)]

    @torch.no_grad()
    def _average(self) -> None:
        """The teacher's weights: an exponential moving average of the adapted ones."""
        for t, p in zip(self.teacher_params, self.params):
            t.lerp_(p, 1.0 - self.cfg.teacher_momentum)

    @torch.no_grad()
    def _project(self) -> None:
        """Clamp every adapted weight into its trust region around the base value."""
        radius = self.cfg.drift_radius
        for p, anchor in zip(self.params, self.anchors):
            torch.clamp(p, anchor - radius, anchor + radius, out=p)

    def _laid_out(self, images: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(x.contiguous(memory_format=self.layout) for x in images)

    def set_probe(self, probe_batch) -> None:
        """Fix the guard's probe batch and measure the base model on it, once for every check that uses it."""
        self.probe_batch = probe_batch
        self.reference = self.measure(probe_batch, self.base)

    @torch.no_grad()
    def measure(self, probe_batch, model: PoseTTPNet | None = None) -> tuple[float, float]:
        """On a probe batch, in one encoder pass at the step's precision (what the guard compares is computed
        alike): the self-supervised loss and the mean over images and joints of the supervised heatmap's peak.
        `model` defaults to the adapted one (its loss view)."""
        model = model or self.loss_model
        target, source = self._laid_out(probe_batch)
        with autocast(self.device, self.cfg.amp):
            out = model.pose(target)
            loss, _ = self_loss(model, self.recon_loss, target, source, h_self=out.get("h_self"),
                                frozen_appearance=self.frozen_appearance, update_means=False,
                                rotations=torch.Generator().manual_seed(self.seed))  # the same draws every time
            return float(loss), float(out["h_sup"].float().amax(dim=(2, 3)).mean())

    def check_pose_signal(self, probe_batch) -> bool:
        """Measure the base model's pose signal on the probe batch; stop (keep the base) when too weak."""
        if not self.base.has_reconstruction or not self.cfg.min_pose_signal:
            return True
        self.pose_signal = pose_signal(self.base, self.recon_loss, *probe_batch)[1]
        if self.pose_signal < self.cfg.min_pose_signal:
            self.guard_events += 1
            self.safeguards.append({"safeguard": "pose-signal check", "after_updates": self.updates, "kept": "base",
                                    "reason": f"pose signal {self.pose_signal:.3f} < ttp.min_pose_signal "
                                              f"{self.cfg.min_pose_signal:g}: the reconstruction hardly depends on "
                                              f"where the keypoints are"})
            self.stopped = True
        return not self.stopped

    def signal_allows(self, frames_seen: int, probe) -> bool:
        """The online pose-signal gate: no update before `signal_frames` frames are in (then `probe()` gives the
        batch to check on, once), none after a failed check or a rollback."""
        if self.cfg.min_pose_signal and self.base.has_reconstruction and self.pose_signal is None:
            if frames_seen < self.cfg.signal_frames:
                return False
            self.check_pose_signal(probe())
        return not self.stopped

    def check(self) -> None:
        """Guard: the adapted model's measures on the probe batch vs the base model's; roll back on divergence."""
        if not self.cfg.guard or self.stopped:
            return
        value, confidence = self.measure(self.probe_batch)
        reference, base_confidence = self.reference
        diverged = not math.isfinite(value) or value > self.cfg.guard_ratio * reference
        less_sure = bool(self.cfg.guard_confidence) and confidence < self.cfg.guard_confidence * base_confidence
        if diverged:
            self._rollback("collapse guard", f"self-supervised loss {value:.4g} > ttp.guard_ratio "
                                             f"{self.cfg.guard_ratio:g} x the base's {reference:.4g}")
        elif less_sure:
            self._rollback("collapse guard", f"heatmap confidence {confidence:.3g} < ttp.guard_confidence "
                                             f"{self.cfg.guard_confidence:g} x the base's {base_confidence:.3g}")
        else:
            self.good_state = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def _rollback(self, safeguard: str, reason: str) -> None:
        """Restore the last weights that passed the guard (else the base) and stop adapting this person."""
        self.guard_events += 1
        self.safeguards.append({"safeguard": safeguard, "after_updates": self.updates, "reason": reason,
                                "kept": "the last weights that passed" if self.good_state is not None else "base"})
        if self.good_state is not None:
            state = self.model.state_dict()
            for n, v in self.good_state.items():
                state[n].copy_(v)
        else:
            self.model.load_state_dict(self.base_state)
        self.stopped = True


@torch.no_grad()
def temporal_keep(adapter: _Adapter, crops: torch.Tensor, groups: np.ndarray, t: int) -> torch.Tensor:
    """Online: 1 for the joints whose teacher prediction moved at most `temporal_agreement` heatmap px from frame
    t-1 to frame t (same video; the crops follow the person, so a joint that jumps is a guess), else 0."""
    if groups[t - 1] != groups[t]:
        return torch.ones(adapter.base.cfg.num_joints)
    coords = adapter.teacher_labels(crops[t - 1:t + 1].to(adapter.device).contiguous(memory_format=adapter.layout))
    return ((coords[1] - coords[0]).norm(dim=-1) <= adapter.cfg.temporal_agreement).float()


def _draw(pool: np.ndarray, k: int, gen: torch.Generator) -> np.ndarray:
    return pool[torch.randint(len(pool), (k,), generator=gen).numpy()]


def draw_sources(groups: np.ndarray, targets: np.ndarray, limit: int, gen: torch.Generator,
                 cross_video: float = 0.0) -> np.ndarray:
    """A source index for each target among frames < limit: from the target's video, or with probability
    `cross_video` from another video where there is one (another camera: the reconstruction must then explain a
    change of view, where a steady per-video keypoint offset shows)."""
    earlier = np.arange(len(groups)) < limit

    def source(t: int) -> int:
        if cross_video > 0 and torch.rand((), generator=gen).item() < cross_video:
            other = np.flatnonzero(earlier & (groups != groups[t]))
            if len(other):
                return _draw(other, 1, gen)[0]
        return _draw(np.flatnonzero(earlier & (groups == groups[t])), 1, gen)[0]

    return np.array([source(t) for t in targets])


def draw_pairs(crops: torch.Tensor, groups: np.ndarray, targets: np.ndarray, limit: int, gen: torch.Generator,
               cross_video: float = 0.0, augment: Augmentation = Augmentation()):
    """(target, source) crops (sources by `draw_sources`) under one shared augmentation."""
    sources = draw_sources(groups, targets, limit, gen, cross_video)
    return shared_augment(crops[targets], crops[sources], gen, augment)


def probe_pairs(crops: torch.Tensor, groups: np.ndarray, limit: int, batch_size: int, seed: int,
                cross_video: float = 0.0, augment: Augmentation = Augmentation()):
    """A fixed probe batch among frames < limit (its own generator: reproducible, look-ahead free)."""
    g = torch.Generator().manual_seed(seed + 7919)
    return draw_pairs(crops, groups, _draw(np.arange(limit), batch_size, g), limit, g, cross_video, augment)


def personalize(model: PoseTTPNet, recon_loss: ReconstructionLoss | None, crops: torch.Tensor,
                matrices: np.ndarray, groups: np.ndarray, cfg: TTPConfig, scenario: str,
                seed: int = 0, on_frame=None, augment: Augmentation = Augmentation(), on_progress=None) -> TTPResult:
    """Personalize on one person's crops (N, 3, S, S) with their crop affines and video ids (groups).

    `on_frame(t, prediction)` is called after each online prediction (for curves/overlays); `on_progress(done,
    total, loss)` after each offline step and each online frame. `augment` is the pairs' rotation/scale,
    `Augmentation.from_data(cfg.data)` of the model's config (the default is `data.*`'s defaults).
    """
    if scenario not in ("online", "offline"):
        raise ValueError(f"scenario must be online or offline, got {scenario!r}")
    if model.variant == "baseline":
        raise ValueError("the baseline variant has no self-supervised task to personalize with")
    if scenario == "online" and cfg.min_pose_signal and model.has_reconstruction and len(crops) < cfg.signal_frames:
        raise ValueError(f"online TTP adapts only once ttp.signal_frames={cfg.signal_frames} frames are in (the "
                         f"pose-signal check needs them); this clip has {len(crops)}")
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    groups = np.asarray(groups)
    n, bs = len(crops), cfg.batch_size
    adapter = _Adapter(model, recon_loss, cfg, seed)

    def pairs(targets: np.ndarray, limit: int, g: torch.Generator):
        return draw_pairs(crops, groups, targets, limit, g, cfg.cross_video, augment)

    def probe(limit: int):
        return probe_pairs(crops, groups, limit, bs, seed, cfg.cross_video, augment)

    losses: list[float] = []
    if scenario == "offline":
        probe_batch = probe(n)
        adapter.check_pose_signal(probe_batch)
        if cfg.guard:
            adapter.set_probe(probe_batch)
        for step in range(cfg.steps):
            if adapter.stopped:  # a safeguard kept the base or rolled back: no more updates
                break
            losses.append(adapter.step(*pairs(_draw(np.arange(n), bs, gen), n, gen)))
            if cfg.guard and (step + 1) % cfg.guard_window == 0:
                adapter.check()
            if on_progress is not None:
                on_progress(step + 1, cfg.steps, losses[-1])
        predictions = predict_crops(adapter.standard_layout(), crops, matrices)
    else:
        predictions = np.zeros((n, model.cfg.num_joints, 3), np.float32)
        probe_limit = 0  # the guard's probe batch is drawn from the first probe_limit frames
        for t in range(n):
            if cfg.reset_every and t and t % cfg.reset_every == 0:
                adapter.reset()
            # adapt once the pose signal allows it and an earlier frame of this video exists
            if adapter.signal_allows(t + 1, lambda: probe(t + 1)) and (groups[:t] == groups[t]).any():
                keep = temporal_keep(adapter, crops, groups, t) if cfg.temporal_agreement else None
                for _ in range(cfg.iters):
                    target, source = pairs(np.full(bs, t), t, gen)
                    losses.append(adapter.step(target, source, keep))
                if cfg.guard and (t + 1) % cfg.guard_window == 0:
                    if t + 1 >= 2 * probe_limit:  # redrawn as the stream doubles: the base is measured log2(n) times
                        probe_limit = t + 1
                        adapter.set_probe(probe(probe_limit))
                    adapter.check()
            predictions[t] = predict_crops(adapter.model, crops[t:t + 1], matrices[t:t + 1])[0]
            if on_frame is not None:
                on_frame(t, predictions[t])
            if on_progress is not None:
                on_progress(t + 1, n, losses[-1] if losses else float("nan"))
        probe_batch = probe(n)  # for the report only, after every prediction is made
        adapter.standard_layout()
    finite = [x for x in losses if math.isfinite(x)]
    metrics = {
        "scenario": scenario, "frames": int(n), "steps": len(losses),
        "loss_before": adapter.measure(probe_batch, adapter.base)[0], "loss_after": adapter.measure(probe_batch)[0],
        "loss_first": finite[0] if finite else float("nan"), "loss_last": finite[-1] if finite else float("nan"),
        "guard_events": adapter.guard_events, "safeguards": adapter.safeguards, "pose_signal": adapter.pose_signal,
        "seconds": time.perf_counter() - t0,
    }
    state = {k: v.detach().clone() for k, v in adapter.model.state_dict().items()}
    return TTPResult(predictions=predictions, state=state, metrics=metrics)
