"""`posettp reproduce`: the paper's Table 1, Table 2, Table 5, Figure 3 and Figure 4 on our data.

Everything lands under `--out` (models, per-run JSON, markdown tables, PNGs, the
resolved config). Each trained model and each evaluation is cached on disk, so
an interrupted run resumes where it stopped. With `--jobs N` the models and
evaluations an experiment reads are first computed by N worker processes (each
with its share of the cores: training and TTP run one thread apiece on small
models, so one process leaves the other cores idle); the tables are then built
from the cache exactly as in a serial run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np
from scipy.signal import savgol_filter
from tqdm import tqdm

from core.checkpoints import model_with_loss
from core.frames import labeled_person_frames
from core.scoring import evaluate_person, per_frame_pck, score
from data.shards import load_frames, read_joint_set
from model import io
from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import INFERENCE_ONLY, VARIANTS, Config, apply_overrides, from_dict, load_config
from model.device import pick_device
from model.joints import joint_set, require_same

from .local import train_local

log = logging.getLogger(__name__)
SCENARIOS = ("none", "online", "offline")


def _cached(path: Path, compute):
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1, default=float))
    tmp.replace(path)
    return value


class Experiment:
    """Shared state of one reproduce run: config, data, cached models."""

    def __init__(self, cfg: Config, out: Path, seeds: int, worker: bool = False, variants=VARIANTS,
                 device: str = "auto", eval_data: str | None = None):
        """`worker`: one of `compute_in_parallel`'s processes, silent; the run itself records and checks --out.
        `variants`: Table 1's rows (a subset costs less: a longer-training run of two variants fits where four
        do not); with the baseline among them, each row's (+Δ) is against it. `device`: where models train and
        evaluate (`model.device.pick_device`); each model and evaluation records it. `eval_data`: the persons
        evaluated and personalized on (their `data.test_split`) when they are not data.url's: validation persons
        of their own seed, say; the models still train on data.url, and one --out holds every set's evaluations."""
        if not variants or not set(variants) <= set(VARIANTS):
            raise ValueError(f"variants must come from {VARIANTS}, got {list(variants)}")
        self.cfg, self.out, self.seeds, self.progress = cfg, out, seeds, not worker
        self.device = pick_device(device)
        self.variants = tuple(v for v in VARIANTS if v in variants)
        self.data_url = cfg.data.url
        self.eval_url = eval_data or cfg.data.url
        self.joints = joint_set(cfg.model.joint_set)
        self.metric = self.joints.headline  # what every table reports: the joint set's metric
        self.label = self.metric.upper().replace("MACC", "mAcc")
        for url in dict.fromkeys((self.data_url, self.eval_url)):
            require_same(self.joints, f"the config (data.dataset {cfg.data.dataset})", read_joint_set(url),
                         f"data {url}")
        # evaluations of other persons than data.url's test split are named apart
        persons = (self.eval_url, cfg.data.test_split)
        self.persons_tag = "" if persons == (self.data_url, "test") else \
            "-p" + hashlib.sha1(json.dumps(persons).encode()).hexdigest()[:8]
        self._train_frames = None
        self._test = None
        if not worker:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(cfg.to_json())
            self._refuse_stale_cache()

    def inference_tag(self, flip_test: bool | None = None) -> str:
        """Decoding and the flip test are inference only: cached models are reused whatever they are, their
        evaluations are not (the tag names them). `flip_test` overrides the run's."""
        flip = self.cfg.model.flip_test if flip_test is None else flip_test
        return ("" if self.cfg.model.decode == "quarter" else f"-{self.cfg.model.decode}") + \
            ("-fliptest" if flip else "")

    def training_config(self, variant: str, seed: int) -> Config:
        return _with(self.cfg, [f"model.variant={variant}", f"train.seed={seed}"])

    def _refuse_stale_cache(self) -> None:
        """Models (and the evaluations cached with them) made with other model/loss/train/data settings would
        be mixed into this run's tables: refuse such an --out instead. The inference-only settings are not: they
        do not change training, and the evaluations' cache names carry them."""
        for meta in sorted((self.out / "models").glob("*/config.json")):
            trained = from_dict(json.loads(meta.read_text())["config"])
            wanted = self.training_config(trained.model.variant, trained.train.seed)
            stale = [f"{section}.{k}" for section in ("model", "loss", "train", "data")
                     for k, v in getattr(wanted, section).__dict__.items()
                     if getattr(getattr(trained, section), k) != v
                     and not (section == "model" and k in INFERENCE_ONLY)
                     and not (section == "data" and k == "test_split")]
            if stale:
                raise ValueError(f"{meta.parent} was made with other settings ({', '.join(stale)}); "
                                 "use another --out for these")

    def test_persons(self) -> dict[str, list]:
        if self._test is None:
            self._test = labeled_person_frames(self.eval_url, self.cfg.data.test_split)
            if not self._test:
                raise ValueError(f"{self.eval_url}: no labeled persons in split {self.cfg.data.test_split!r}")
        return self._test

    def model_path(self, variant: str, seed: int) -> Path:
        return self.out / "models" / f"{variant}-s{seed}"

    def model(self, variant: str, seed: int, flip_test: bool | None = None):
        """Train (or reuse) one variant/seed; returns (model, recon_loss, cfg), predicting with this run's
        inference settings (`flip_test` overrides the run's)."""
        path = self.model_path(variant, seed)
        if not (path / "model.safetensors").is_file():
            if self._train_frames is None:
                self._train_frames = load_frames(self.data_url, split=self.cfg.data.train_split)
            cfg = self.training_config(variant, seed)
            t0 = time.perf_counter()
            model, recon, history = train_local(cfg, self._train_frames, progress=self.progress,
                                                desc=f"train {variant} s{seed}", device=self.device)
            save_checkpoint(str(path), model, cfg, cfg.train.max_steps,
                            {"train_seconds": time.perf_counter() - t0, "history": history,
                             "device": str(self.device)}, recon)
        ck = load_checkpoint(str(path))
        for name in INFERENCE_ONLY:  # the model's cfg: it predicts as this run says
            setattr(ck.config.model, name, getattr(self.cfg.model, name))
        if flip_test is not None:
            ck.config.model.flip_test = flip_test
        model, recon = model_with_loss(ck, self.device)
        return model, recon, ck.config

    def ttp(self, overrides=(), scenario: str = "") -> tuple:
        """This run's TTP settings (with overrides) and a short key naming them in cache file names. An offline key
        leaves out `temporal_agreement`, which gates online updates only: runs that differ by it alone are one run."""
        ttp = _with(self.cfg, list(overrides)).ttp
        keyed = dataclasses.replace(ttp, temporal_agreement=0.0) if scenario == "offline" else ttp
        return ttp, "-" + hashlib.sha1(json.dumps(dataclasses.asdict(keyed), sort_keys=True).encode()).hexdigest()[:8]

    def evaluation(self, variant: str, seed: int, scenario: str, tag: str = "", ttp_overrides=(),
                   flip_test: bool | None = None) -> dict:
        """Per-person scores (cached) of one model under one scenario.

        TTP runs with this run's `ttp` settings (not those stored with the model), and they are part of the
        cache key: re-running with another `--set ttp.*` evaluates again instead of returning stale results.
        `flip_test` overrides the run's inference (Table 1 scores the model without TTP both ways).
        """
        ttp, _ = self.ttp(ttp_overrides)
        path = self.evaluation_path(variant, seed, scenario, tag, ttp_overrides, flip_test)

        def compute():
            model, recon, cfg = self.model(variant, seed, flip_test)
            cfg = dataclasses.replace(cfg, ttp=ttp)
            rows = []
            t0 = time.perf_counter()
            for pid, frames in tqdm(self.test_persons().items(), desc=f"{variant} s{seed} {scenario}{tag}",
                                    mininterval=5, disable=not self.progress):
                res = evaluate_person(model, recon, cfg, frames, scenario, seed=seed)
                res["predictions"] = res["predictions"].tolist()
                rows.append({"person_id": pid, **res})
            return {"variant": variant, "seed": seed, "scenario": scenario, "persons": rows,
                    "seconds": time.perf_counter() - t0, "device": str(self.device)}
        return _cached(path, compute)

    def evaluation_path(self, variant: str, seed: int, scenario: str, tag: str = "", ttp_overrides=(),
                        flip_test: bool | None = None) -> Path:
        """A tag names an evaluation under TTP overrides; overrides that change nothing name the run's own one
        (Table 2's one-update guarded cell is Table 1's online evaluation when the config runs one update with
        the guard), so it is computed once."""
        key = ""
        if scenario != "none":
            ttp, key = self.ttp(ttp_overrides, scenario)
            if ttp == self.ttp()[0]:
                tag = ""
        return self.out / "evals" / \
            f"{variant}-s{seed}-{scenario}{tag}{self.inference_tag(flip_test)}{key}{self.persons_tag}.json"


def _with(cfg: Config, overrides: list[str]) -> Config:
    return apply_overrides(from_dict(cfg.to_dict()), overrides)


def paired(a: dict, b: dict, key: str) -> np.ndarray:
    """Per-person differences b - a (same persons, same order)."""
    da = {r["person_id"]: r[key] for r in a["persons"]}
    return np.array([r[key] - da[r["person_id"]] for r in b["persons"]])


def gains_per_person(pairs: list[tuple[dict, dict]], key: str) -> dict[str, float]:
    """Each person's gain averaged over the (without, with) evaluation pairs of the training seeds. A person x seed
    pair that loses a point mostly gains on the other seeds (with the opt-in pseudo-labels, all 3 of the transformer's
    offline pairs below -1 gained on both other seeds): whether TTP hurts a person is this mean; table1 reports both
    counts."""
    gains: dict[str, list[float]] = {}
    for without, with_ in pairs:
        for r, gain in zip(with_["persons"], paired(without, with_, key)):
            gains.setdefault(r["person_id"], []).append(gain)
    return {person: float(np.mean(g)) for person, g in gains.items()}


def gain_summary(pairs: list[tuple[dict, dict]], key: str) -> dict:
    """The paired gain of (without, with) evaluation pairs, one per training seed, with its uncertainty by person:
    a person's gains correlate across seeds, so the person x seed pairs are not independent samples. The mean and
    standard error are over the per-person means (a standard error clustered by person); the pair counts are kept
    beside them."""
    person = np.array(list(gains_per_person(pairs, key).values()))
    diffs = np.concatenate([paired(without, with_, key) for without, with_ in pairs])
    return {"gain_mean": float(person.mean()),
            "gain_se": float(person.std(ddof=1) / np.sqrt(len(person))) if len(person) > 1 else 0.0,
            "persons": int(len(person)), "person_gain_min": float(person.min()),
            "person_gain_max": float(person.max()), "persons_worse_1pck_over_seeds": int((person < -0.01).sum()),
            "pairs": int(len(diffs)), "pair_gain_min": float(diffs.min()),
            "persons_worse_1pck": int((diffs < -0.01).sum())}


def mean_std(values) -> str:
    values = np.asarray(values, dtype=float) * 100
    return f"{values.mean():.1f} ± {values.std():.1f}" if len(values) > 1 else f"{values.mean():.1f}"


def _points(summary: dict) -> str:
    return f"{summary['gain_mean'] * 100:+.1f} ± {summary['gain_se'] * 100:.1f}"


def table1(exp: Experiment) -> dict:
    """The paper's Table 1, and each TTP gain against the best inference without personalization: the same model
    with the flip test (TTP evaluations predict with the run's `model.flip_test`; with it on, the flip test is on
    both sides), with the gain over the plain model beside it."""
    results, lines, gains, spread = {}, [], [], []
    seeds = range(exp.seeds)
    mean = lambda e: np.mean([r[exp.metric] for r in e["persons"]])  # noqa: E731
    base_means = [mean(exp.evaluation("baseline", s, "none")) for s in seeds] if "baseline" in exp.variants else []
    lines.append("| method | w/o TTP | online TTP | offline TTP |")
    lines.append("| --- | --- | --- | --- |")
    for variant in exp.variants:
        row, cells = {}, []
        without = [exp.evaluation(variant, s, "none") for s in seeds]
        flip = [exp.evaluation(variant, s, "none", flip_test=True) for s in seeds]
        plain = [exp.evaluation(variant, s, "none", flip_test=False) for s in seeds]
        for scenario in SCENARIOS:
            if variant == "baseline" and scenario != "none":
                cells.append("–")
                continue
            evals = without if scenario == "none" else [exp.evaluation(variant, s, scenario) for s in seeds]
            means = [mean(e) for e in evals]
            entry = {f"{exp.metric}_mean": float(np.mean(means)), f"{exp.metric}_std": float(np.std(means)),
                     "per_seed": [float(m) for m in means]}
            cell = mean_std(means)
            if base_means:
                entry["vs_baseline"] = float(np.mean(means) - np.mean(base_means))
                cell += f" ({entry['vs_baseline'] * 100:+.1f})"
            if scenario != "none":
                vs_flip, vs_plain = (gain_summary(list(zip(ref, evals)), exp.metric) for ref in (flip, plain))
                entry.update(vs_flip_tested=vs_flip, vs_plain=vs_plain,
                             guard_events=int(sum(r.get("ttp", {}).get("guard_events", 0)
                                                  for e in evals for r in e["persons"])))
                cell += f" [TTP {_points(vs_flip)}]"
                gains.append(f"| {variant} | {scenario} | {_points(vs_flip)} | {_points(vs_plain)} | "
                             f"{vs_flip['person_gain_min'] * 100:+.1f} | {vs_flip['persons_worse_1pck_over_seeds']} "
                             f"of {vs_flip['persons']} | {vs_flip['persons_worse_1pck']} of {vs_flip['pairs']} |")
                spread.append(f"{variant} {scenario}: each person's gain over the flip-tested model (mean over seeds)"
                              f" {vs_flip['person_gain_min'] * 100:+.1f} to {vs_flip['person_gain_max'] * 100:+.1f}")
            row[scenario] = entry
            cells.append(cell)
        row["none"].update(flip_tested=float(np.mean([mean(e) for e in flip])),  # the two references' means
                           plain=float(np.mean([mean(e) for e in plain])))
        results[variant] = row
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines.append("")
    flip_note = "with the flip test" if exp.cfg.model.flip_test else "without the flip test"
    lines.append(f"{exp.label} (%) on {len(exp.test_persons())} unseen persons ({exp.eval_url}, split "
                 f"{exp.cfg.data.test_split}), {flip_note}; mean ± std over {exp.seeds} training seeds"
                 + ("; (+Δ) vs baseline" if base_means else "") + "; [TTP gain] over the same model with the flip "
                 "test and without TTP, per person (mean over seeds), mean ± standard error over persons.")
    if gains:  # none with --variants baseline
        lines += ["", f"TTP gain ({exp.label} points, per person: mean over seeds; ± standard error over persons):", "",
                  "| method | scenario | vs flip-tested model | vs plain model | worst person | persons losing > 1 "
                  "| person x seed pairs losing > 1 |", "| --- | --- | --- | --- | --- | --- | --- |", *gains,
                  "", "Per-person spread:", *(f"- {line}" for line in spread)]
    return {"results": results, "markdown": "\n".join(lines)}


def _table2_run(iters: int, guard: bool) -> tuple[str, tuple[str, ...]]:
    """Cache tag and TTP overrides of one Table 2 cell (without the guard, the pose-signal check and the trust
    region are off too: the paper's plain TTP)."""
    overrides = (f"ttp.iters={iters}", f"ttp.guard={guard}") + (() if guard else ("ttp.min_pose_signal=0",
                                                                                  "ttp.drift_steps=0"))
    return f"-it{iters}-{'guard' if guard else 'noguard'}", overrides


def table2(exp: Experiment) -> dict:
    """The paper's Table 2: online TTP with 1 to 4 updates per frame, with and without the guard. Each cell's gain is
    over the same model without TTP (predicting with the run's `model.flip_test`), per person (mean over seeds),
    ± standard error over persons, with the worst person beside it."""
    lines = ["| iterations | online, no guard | online, guard |", "| --- | --- | --- |"]
    none = [exp.evaluation("transformer", s, "none") for s in range(exp.seeds)]
    base = np.mean([np.mean([r[exp.metric] for r in e["persons"]]) for e in none])
    results = {"no_ttp": float(base)}
    for iters in (1, 2, 3, 4):
        cells = []
        for guard in (False, True):
            tag, overrides = _table2_run(iters, guard)
            evals = [exp.evaluation("transformer", s, "online", tag, overrides) for s in range(exp.seeds)]
            means = [np.mean([r[exp.metric] for r in e["persons"]]) for e in evals]
            events = sum(r["ttp"]["guard_events"] for e in evals for r in e["persons"])
            gain = gain_summary(list(zip(none, evals)), exp.metric)
            results[tag[1:]] = {exp.metric: float(np.mean(means)), "guard_events": int(events), "vs_no_ttp": gain}
            cells.append(f"{np.mean(means) * 100:.1f} ({_points(gain)}; worst person "
                         f"{gain['person_gain_min'] * 100:+.1f}, {gain['persons_worse_1pck_over_seeds']} of "
                         f"{gain['persons']} lose > 1)" + (f", guard fired {events}×" if guard else ""))
        lines.append(f"| {iters} | " + " | ".join(cells) + " |")
    lines.append(f"\nw/o TTP: {base * 100:.1f} {exp.label} (transformer, {exp.seeds} seeds). (gain over it, per "
                 "person: mean over seeds; ± standard error over persons)")
    return {"results": results, "markdown": "\n".join(lines)}


def fig3(exp: Experiment) -> dict:
    """Online improvement vs frame index: mean per-frame PCK gain over persons and seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = []
    for s in range(exp.seeds):
        none, online = exp.evaluation("transformer", s, "none"), exp.evaluation("transformer", s, "online")
        for rn, ro in zip(none["persons"], online["persons"]):
            frames = exp.test_persons()[rn["person_id"]]
            per_frame = (per_frame_pck(np.array(ro["predictions"]), frames, exp.joints)
                         - per_frame_pck(np.array(rn["predictions"]), frames, exp.joints))
            curves.append(per_frame)
    length = min(len(c) for c in curves)
    gain = np.nanmean(np.array([c[:length] for c in curves]), axis=0) * 100
    window = max(3, length // 10)
    smooth = np.convolve(gain, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(gain, alpha=0.3, label="per frame")
    ax.plot(np.arange(len(smooth)) + window // 2, smooth, label=f"moving mean ({window})")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("frame index in the person's stream")
    ax.set_ylabel(f"online TTP gain ({exp.label} points)")
    ax.set_title("Figure 3: online improvement vs frame index")
    ax.legend()
    fig.tight_layout()
    png = exp.out / "fig3_online_gain.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return {"results": {"gain_per_frame": gain.tolist()}, "png": str(png),
            "markdown": f"![fig3]({png.name})\n\nmean gain first third {gain[:length // 3].mean():+.2f}, "
                        f"last third {gain[-length // 3:].mean():+.2f} PCK points"}


def fig4(exp: Experiment) -> dict:
    """Offline gain vs the number of unlabeled frames used for adaptation (the person's extra frames)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    extras = {pid: [f for f in load_frames(exp.eval_url, split=exp.cfg.data.test_split, person=pid)
                    if not f.keypoints[:, 2].any()] for pid in exp.test_persons()}
    available = min(len(v) for v in extras.values())
    if not available:
        raise ValueError(f"{exp.eval_url}: fig4 needs unlabeled extra frames of the test persons "
                         "(posettp synth --extra-frames)")
    counts = tuple(n for n in (10, 25, 50, 100, 200) if n < available) + (min(available, 200),)
    rows = {n: [] for n in counts}
    ttp, key = exp.ttp()
    for s in range(exp.seeds):
        model, recon, cfg = exp.model("transformer", s)
        cfg = dataclasses.replace(cfg, ttp=ttp)
        none = {r["person_id"]: r for r in exp.evaluation("transformer", s, "none")["persons"]}

        def compute(n, s=s, model=model, recon=recon, cfg=cfg, none=none):
            out = []
            for pid, frames in tqdm(exp.test_persons().items(), desc=f"fig4 s{s} {n} frames", mininterval=5):
                res = evaluate_person(model, recon, cfg, frames, "offline", seed=s, adapt_frames=extras[pid][:n])
                out.append(res[exp.metric] - none[pid][exp.metric])
            return out
        for n in counts:
            rows[n] += _cached(exp.out / "evals" / f"fig4-s{s}-n{n}{exp.inference_tag()}{key}{exp.persons_tag}.json",
                               lambda n=n: compute(n))
    means = [np.mean(rows[n]) * 100 if rows[n] else float("nan") for n in counts]
    ses = [np.std(rows[n], ddof=1) / np.sqrt(len(rows[n])) * 100 if len(rows[n]) > 1 else 0 for n in counts]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.errorbar(counts, means, yerr=ses, marker="o", capsize=3)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("unlabeled frames used for offline TTP")
    ax.set_ylabel(f"gain over no TTP ({exp.label} points)")
    ax.set_title("Figure 4: gain vs amount of unlabeled data")
    fig.tight_layout()
    png = exp.out / "fig4_gain_vs_frames.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    md = "| unlabeled frames | " + " | ".join(map(str, counts)) + " |\n| --- |" + " --- |" * len(counts) + "\n"
    md += "| gain (PCK points) | " + " | ".join(f"{m:+.1f} ± {e:.1f}" for m, e in zip(means, ses)) + " |"
    return {"results": {"counts": counts, "gain_mean": means, "gain_se": ses}, "png": str(png),
            "markdown": md + f"\n\n![fig4]({png.name})"}


def smooth_predictions(predictions: np.ndarray, frames: list, window: int = 7, order: int = 2) -> np.ndarray:
    """Savitzky-Golay smoothing of joint trajectories within each video."""
    out = predictions.copy()
    videos = np.array([f.video_id for f in frames])
    for v in np.unique(videos):
        idx = np.flatnonzero(videos == v)
        if len(idx) > window:
            out[idx, :, :2] = savgol_filter(predictions[idx, :, :2], window, order, axis=0)
    return out


def table5(exp: Experiment) -> dict:
    lines = ["| transformer | w/o TTP | online TTP | offline TTP |", "| --- | --- | --- | --- |"]
    results = {}
    for smoothing in (False, True):
        cells = []
        for scenario in SCENARIOS:
            vals = []
            for s in range(exp.seeds):
                for r in exp.evaluation("transformer", s, scenario)["persons"]:
                    frames = exp.test_persons()[r["person_id"]]
                    pred = np.array(r["predictions"], dtype=np.float32)
                    pred = smooth_predictions(pred, frames) if smoothing else pred
                    vals.append(score(pred, frames, exp.joints)[exp.metric])
            results[f"{scenario}{'_smoothed' if smoothing else ''}"] = float(np.mean(vals))
            cells.append(f"{np.mean(vals) * 100:.1f}")
        lines.append(f"| {'+ Savitzky–Golay' if smoothing else 'raw'} | " + " | ".join(cells) + " |")
    return {"results": results, "markdown": "\n".join(lines)}


EXPERIMENTS = {"table1": table1, "table2": table2, "table5": table5, "fig3": fig3, "fig4": fig4}


def evaluations_read(experiment: str, seeds: int, variants=VARIANTS) -> list[tuple]:
    """The `Experiment.evaluation` arguments an experiment reads (fig4 adds its own offline runs, kept serial)."""
    if experiment == "table1":
        return [(v, s, scenario) for v in variants for s in range(seeds) for scenario in SCENARIOS
                if v != "baseline" or scenario == "none"] + [
            (v, s, "none", "", (), flip) for v in variants for s in range(seeds) for flip in (True, False)]
    if experiment == "table2":
        return [("transformer", s, "none") for s in range(seeds)] + [
            ("transformer", s, "online", *_table2_run(iters, guard))
            for iters in (1, 2, 3, 4) for guard in (False, True) for s in range(seeds)]
    if experiment == "fig4":
        return [("transformer", s, "none") for s in range(seeds)]
    return [("transformer", s, scenario) for s in range(seeds) for scenario in SCENARIOS]  # fig3, table5


_worker: Experiment | None = None


def _start_worker(cfg_dict: dict, out: str, seeds: int, threads: int, device: str, eval_data: str) -> None:
    import torch

    global _worker
    torch.set_num_threads(threads)
    _worker = Experiment(from_dict(cfg_dict), Path(out), seeds, worker=True, device=device, eval_data=eval_data)


def _train(variant: str, seed: int) -> None:
    _worker.model(variant, seed)


def _evaluate(run: tuple) -> None:
    _worker.evaluation(*run)


def compute_in_parallel(exp: Experiment, runs: list[tuple], jobs: int) -> None:
    """Train the models and run the evaluations that are not cached yet in `jobs` processes; each evaluation
    starts as soon as its model exists. Costliest models first (the keypoint variants render images)."""
    by_path: dict[Path, tuple] = {}
    for r in runs:  # one run per cache file: runs whose overrides change nothing share the run's own
        by_path.setdefault(exp.evaluation_path(*r), r)
    todo = [r for path, r in by_path.items() if not path.is_file()]
    models = sorted({r[:2] for r in todo}, key=lambda m: (m[0] not in ("transformer", "shared_keypoint"), m))
    untrained = [m for m in models if not (exp.model_path(*m) / "model.safetensors").is_file()]
    if not todo:
        return
    threads = max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")  # no forked torch/OpenMP state
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_start_worker,
                             initargs=(exp.cfg.to_dict(), str(exp.out), exp.seeds, threads, str(exp.device),
                                       exp.eval_url)) as pool, \
            tqdm(total=len(untrained) + len(todo), desc=f"models and evaluations ({jobs} jobs)") as bar:
        pending = {pool.submit(_train, *m): m for m in untrained}
        ready = [m for m in models if m not in untrained]
        while ready or pending:
            for m in ready:
                pending.update({pool.submit(_evaluate, r): r for r in todo if r[:2] == m})
            ready = []
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                task = pending.pop(future)
                if future.exception() is not None:  # a worker's error ends the run, with its traceback
                    pool.shutdown(cancel_futures=True)
                    raise future.exception()
                bar.update()
                if len(task) == 2:
                    ready.append(task)


def main(args) -> int:
    cfg = load_config(args.config, args.overrides)
    out = Path(args.out)
    exp = Experiment(cfg, out, args.seeds, variants=args.variants.split(","), device=args.device,
                     eval_data=args.eval_data)
    t0 = time.perf_counter()
    if args.jobs > 1:
        compute_in_parallel(exp, evaluations_read(args.experiment, args.seeds, exp.variants), args.jobs)
    result = EXPERIMENTS[args.experiment](exp)
    result["wall_seconds"] = time.perf_counter() - t0
    (out / f"{args.experiment}.md").write_text(result["markdown"] + "\n")
    print(result["markdown"])
    print(f"\n{args.experiment}: {result['wall_seconds'] / 60:.1f} min wall; outputs in {out}")
    if args.json_out:
        Path(args.json_out).write_text(io.json_text(result))
    (out / f"{args.experiment}.json").write_text(io.json_text(result))
    return 0
