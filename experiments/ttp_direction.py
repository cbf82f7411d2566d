"""Why some persons lose to TTP: the update's size, its direction, or the noise of its random pairs?

For each test person, offline TTP runs with `--ttp-seeds` different seeds (other random pairs and augmentations;
the first is the seed `posettp reproduce` uses, so it reproduces Table 1's offline scores). Three comparisons:

- sign-flipped null: the first run's delta with every element's sign drawn at random, an update of exactly TTP's
  size with no direction. If it moved persons as much as TTP does, a loss would be the step's size showing through
  a metric that moves in 1/1560 steps (120 frames x 13 joints), and no guard could see it;
- TTP seeds: if a person's gain changes sign from one seed to the next, losses are the noise of the random pairs;
  if the same persons lose under every seed, the objective itself points the wrong way for them;
- the seeds' mean delta: what averaging away the pairs' noise is worth (K times the compute).

The safeguards decide per person and seed whether to adapt at all (a person they keep at the base scores its
base PCK, as in Table 1); the null and the spread across seeds are taken over the persons each seed adapted.

Run: .venv/bin/python -m experiments.ttp_direction --run OUT_OF_REPRODUCE [--seeds 0,1,2 --ttp-seeds 3 --flips 2
     --jobs 2 --out F]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from core.crops import prepare_frames
from core.scoring import score
from model.augment import Augmentation
from model.config import from_dict
from model.delta import apply_delta, deltable_keys, extract_delta
from model.joints import joint_set
from model.personalize import personalize
from model.predict import predict_crops
from training.reproduce import Experiment

TTP_SEED_STRIDE = 1000  # TTP seed k of model seed s is s + 1000 k: k = 0 is reproduce's own


def sign_flipped(delta: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The delta's magnitudes with independent random signs."""
    return {k: v * (torch.randint(0, 2, v.shape, generator=gen) * 2 - 1).to(v.dtype) for k, v in delta.items()}


def mean_delta(deltas: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean; a tensor one run left unchanged counts as zero there."""
    keys = {k for d in deltas for k in d}
    return {k: sum(d[k] for d in deltas if k in d) / len(deltas) for k in keys}


def transformer_setup(run: Path, run_cfg, seed: int):
    """A finished run's transformer of training seed `seed`, with the run's TTP settings: (experiment, model,
    reconstruction loss, config, base state, the delta's keys). Reads the run, writes nothing into it."""
    exp = Experiment(run_cfg, run, seeds=seed + 1, worker=True, device="cpu")
    model, recon, cfg = exp.model("transformer", seed)
    cfg = dataclasses.replace(cfg, ttp=exp.ttp()[0])
    base = {k: v.clone() for k, v in model.state_dict().items()}
    return exp, model, recon, cfg, base, deltable_keys(base, {n for n, _ in model.named_parameters()})


def person_rows(run: Path, run_cfg, seed: int, persons: int, ttp_seeds: int, flips: int) -> list[dict]:
    exp, model, recon, cfg, base, keys = transformer_setup(run, run_cfg, seed)
    scorer = type(model)(model.cfg).eval()
    gen = torch.Generator().manual_seed(seed)

    def pck_with(delta, crops, matrices, frames) -> float:
        scorer.load_state_dict(apply_delta(base, delta))
        return score(predict_crops(scorer, crops, matrices), frames, joint_set(cfg.model.joint_set))["pck@0.2"]

    rows = []
    for pid, frames in tqdm(list(exp.test_persons().items())[:persons], desc=f"transformer s{seed}", mininterval=10):
        crops, matrices, groups = prepare_frames(frames, cfg.model.image_size)
        augment = Augmentation.from_data(cfg.data)
        deltas = [extract_delta(base, personalize(model, recon, crops, matrices, groups, cfg.ttp, "offline",
                                                  seed + TTP_SEED_STRIDE * k, augment=augment).state, keys)
                  for k in range(ttp_seeds)]
        row = {"person_id": pid, "seed": seed, "none": pck_with({}, crops, matrices, frames),
               "adapted": [bool(d) for d in deltas], "ttp": [pck_with(d, crops, matrices, frames) for d in deltas],
               "mean_delta": pck_with(mean_delta(deltas), crops, matrices, frames)}
        if deltas[0]:
            row["flipped"] = [pck_with(sign_flipped(deltas[0], gen), crops, matrices, frames) for _ in range(flips)]
            row["delta_rms"] = float(torch.cat([v.flatten() for v in deltas[0].values()]).pow(2).mean().sqrt())
        rows.append(row)
    return rows


def _stats(x: np.ndarray) -> dict:
    return {"mean": float(x.mean()), "se": float(x.std(ddof=1) / np.sqrt(len(x))), "std": float(x.std(ddof=1)),
            "lose_gt_1": float((x < -1).mean()), "move_gt_1": float((np.abs(x) > 1).mean()), "n": int(len(x))}


def summary(rows: list[dict]) -> dict:
    """Gains in PCK points over no TTP: per TTP seed over every person (Table 1's way), and over the persons that
    every seed adapted (the spread the random pairs alone cause)."""
    gains = np.array([[t - r["none"] for t in r["ttp"]] for r in rows]) * 100  # persons x TTP seeds
    adapted = np.array([r["adapted"] for r in rows])
    always = adapted.all(axis=1)
    out = {"persons": len(rows), "adapted_per_ttp_seed": adapted.sum(axis=0).tolist(),
           "adapted_under_every_ttp_seed": int(always.sum()),
           "ttp_per_seed": [_stats(g) for g in gains.T],
           "mean_delta": _stats(np.array([r["mean_delta"] - r["none"] for r in rows]) * 100),
           "sign_flipped": _stats(np.array([f - r["none"] for r in rows if "flipped" in r for f in r["flipped"]])
                                  * 100),
           "ttp_first_seed_same_persons": _stats(gains[adapted[:, 0], 0])}
    if gains.shape[1] > 1 and always.sum() > 1:
        both = gains[always]
        loses = both < -1
        out["seed_consistency"] = {
            "within_person_std": float(np.sqrt(both.var(axis=1, ddof=1).mean())),
            "between_person_std": float(both.mean(axis=1).std(ddof=1)),
            "correlation": np.corrcoef(both.T).round(3).tolist(),
            "lose_gt_1_under_any_seed": int(loses.any(axis=1).sum()),
            "lose_gt_1_under_every_seed": int(loses.all(axis=1).sum())}
    return out


def run_arguments(description: str) -> argparse.ArgumentParser:
    """The arguments of every per-person analysis of a finished run's transformers."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--run", required=True, help="a `posettp reproduce` --out with models/ and config.json")
    ap.add_argument("--seeds", default="0,1,2", help="which of the run's transformers (training seeds)")
    ap.add_argument("--persons", type=int, default=30)
    ap.add_argument("--jobs", type=int, default=2, help="processes, one training seed each")
    ap.add_argument("--out", default="", help="write the per-person rows and the summary as JSON here")
    return ap


def rows_of_every_seed(rows_of_seed, seeds: str, jobs: int) -> list[dict]:
    """`rows_of_seed(seed)` for each training seed in `seeds` ("0,1,2"), `jobs` seeds at a time in fresh processes
    that share the cores."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        return [r for part in pool.map(rows_of_seed, map(int, seeds.split(","))) for r in part]


def main() -> None:
    ap = run_arguments(__doc__.splitlines()[0])
    ap.add_argument("--ttp-seeds", type=int, default=3)
    ap.add_argument("--flips", type=int, default=2, help="sign-flipped nulls per person")
    args = ap.parse_args()
    run = Path(args.run)
    run_cfg = from_dict(json.loads((run / "config.json").read_text()))
    t0 = time.perf_counter()
    one_seed = partial(person_rows, run, run_cfg, persons=args.persons, ttp_seeds=args.ttp_seeds, flips=args.flips)
    rows = rows_of_every_seed(one_seed, args.seeds, args.jobs)
    result = {"summary": summary(rows), "rows": rows, "ttp_config": dataclasses.asdict(run_cfg.ttp),
              "seconds": time.perf_counter() - t0}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    s = result["summary"]
    print(f"{s['persons']} person x model-seed pairs; adapted under each TTP seed: {s['adapted_per_ttp_seed']} "
          f"(under every one: {s['adapted_under_every_ttp_seed']}; the rest kept the base weights)")
    lines = [(f"TTP seed {k}", x) for k, x in enumerate(s["ttp_per_seed"])] + [
        ("mean delta", s["mean_delta"]), ("TTP seed 0, adapted", s["ttp_first_seed_same_persons"]),
        ("sign-flipped", s["sign_flipped"])]
    for name, x in lines:
        print(f"{name:>19s}: {x['mean']:+.2f} ± {x['se']:.2f} PCK points (std {x['std']:.2f}), "
              f"{x['lose_gt_1'] * 100:.0f} % lose > 1, {x['move_gt_1'] * 100:.0f} % move > 1 either way "
              f"({x['n']} evaluations)")
    if "seed_consistency" in s:
        print("across TTP seeds:", json.dumps(s["seed_consistency"]))
    print(f"{result['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
