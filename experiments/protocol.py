"""The accuracy protocol's candidates (docs/protocol.md) on one set of persons.

Each candidate is `synth_small` plus its TTP flags, run offline and online with the flip test on both sides on the
same three trained transformers (`posettp reproduce`'s cache under --out: models train once, evaluations are keyed
by the TTP settings and the persons). Gains are against the flip-tested model and the plain model, per person (mean
over the training seeds), with standard errors over persons. On the validation persons the protocol's decision rule
names the winner and whether it replaces the default; on the test and fresh persons the same table is only reported.

Run: .venv/bin/python -m experiments.protocol --out runs/r38 --data runs/data/synth --persons-data runs/data/val
         --split val --label val [--candidates default,paper] [--seeds 3] [--jobs 2]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from model.config import load_config
from training.reproduce import Experiment, compute_in_parallel, gain_summary, gains_per_person

SCENARIOS = ("offline", "online")
# The protocol's candidates, as written before their runs (docs/protocol.md); each is synth_small plus these flags.
CANDIDATES = {
    "paper": ["ttp.guard=false", "ttp.min_pose_signal=0", "ttp.drift_steps=0"],
    "default": [],
    "mirror": ["ttp.pseudo_label_weight=300", "ttp.pseudo_label_agreement=0.5"],
    "teacher": ["ttp.teacher_weight=300", "ttp.restore=0.01", "ttp.recon_weight=0"],
    "teacher+recon": ["ttp.teacher_weight=300", "ttp.restore=0.01"],
    "teacher+temporal": ["ttp.teacher_weight=300", "ttp.restore=0.01", "ttp.temporal_agreement=1"],
}
DEFAULT = "default"
LOSS = -0.01  # a person worse by more than one point


def evaluate(name: str, overrides: list[str], args) -> dict:
    """One candidate on the persons: its gains in both scenarios against both references."""
    cfg = load_config(args.config, [f"data.url={args.data}", "model.flip_test=true", f"data.test_split={args.split}",
                                    *overrides])
    exp = Experiment(cfg, Path(args.out), args.seeds, variants=("transformer",), eval_data=args.persons_data)
    seeds = range(args.seeds)
    runs = [("transformer", s, scenario) for s in seeds for scenario in SCENARIOS] + [
        ("transformer", s, "none", "", (), flip) for s in seeds for flip in (True, False)]
    compute_in_parallel(exp, runs, args.jobs)
    flip = [exp.evaluation("transformer", s, "none", flip_test=True) for s in seeds]
    plain = [exp.evaluation("transformer", s, "none", flip_test=False) for s in seeds]
    row = {"overrides": overrides, "config": cfg.to_dict(), "persons": len(exp.test_persons()),
           "flip_tested": float(np.mean([r[exp.metric] for e in flip for r in e["persons"]])),
           "plain": float(np.mean([r[exp.metric] for e in plain for r in e["persons"]]))}
    for scenario in SCENARIOS:
        evals = [exp.evaluation("transformer", s, scenario) for s in seeds]
        row[scenario] = {"vs_flip_tested": gain_summary(list(zip(flip, evals)), exp.metric),
                         "vs_plain": gain_summary(list(zip(plain, evals)), exp.metric),
                         "per_person": gains_per_person(list(zip(flip, evals)), exp.metric),
                         "seconds_per_person": float(np.mean([e["seconds"] / len(e["persons"]) for e in evals]))}
    return row


def verdict(rows: dict) -> list[str]:
    """The protocol's decision rule (validation persons only)."""
    def losers(name):
        return sum(rows[name][s]["vs_flip_tested"]["persons_worse_1pck_over_seeds"] for s in SCENARIOS)

    def score(name):
        return float(np.mean([rows[name][s]["vs_flip_tested"]["gain_mean"] for s in SCENARIOS]))

    eligible = [name for name in rows if losers(name) == 0]
    winner = max(eligible, key=score) if eligible else min(rows, key=lambda n: (losers(n), -score(n)))
    lines = [f"eligible (no person loses more than a point in either scenario): {', '.join(eligible) or 'none'}",
             f"winner: {winner} (score {score(winner) * 100:+.2f}, the mean of its offline and online gains)"]
    if DEFAULT in rows and winner != DEFAULT:
        person = lambda name: {p: np.mean([rows[name][s]["per_person"][p] for s in SCENARIOS])  # noqa: E731
                               for p in rows[name][SCENARIOS[0]]["per_person"]}
        ours, default = person(winner), person(DEFAULT)
        diff = np.array([ours[p] - default[p] for p in ours])
        se = diff.std(ddof=1) / np.sqrt(len(diff))
        replaces = diff.mean() > se
        lines.append(f"{winner} - default: {diff.mean() * 100:+.2f} ± {se * 100:.2f} (paired by person): "
                     + ("it becomes the default" if replaces else "the default stays"))
    return lines


def markdown(rows: dict, label: str) -> str:
    def cell(entry):
        return f"{entry['gain_mean'] * 100:+.2f} ± {entry['gain_se'] * 100:.2f}"

    lines = [f"Persons: {label}. PCK@0.2 points; per person the mean over the training seeds; ± standard error over "
             "persons. The flip test is on both sides.", "",
             "| candidate | offline vs flip-tested | online vs flip-tested | offline vs plain | online vs plain | "
             "worst person off / on | persons losing > 1 off / on | s per person off / on |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in rows.items():
        off, on = (row[s]["vs_flip_tested"] for s in SCENARIOS)
        lines.append(f"| {name} | {cell(off)} | {cell(on)} | {cell(row['offline']['vs_plain'])} | "
                     f"{cell(row['online']['vs_plain'])} | {off['person_gain_min'] * 100:+.1f} / "
                     f"{on['person_gain_min'] * 100:+.1f} | {off['persons_worse_1pck_over_seeds']} / "
                     f"{on['persons_worse_1pck_over_seeds']} of {off['persons']} | "
                     f"{row['offline']['seconds_per_person']:.1f} / {row['online']['seconds_per_person']:.1f} |")
    first = next(iter(rows.values()))
    lines += ["", f"Without TTP: flip-tested {first['flip_tested'] * 100:.1f}, plain {first['plain'] * 100:.1f}."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="a `posettp reproduce` --out: models and evaluations are cached there")
    ap.add_argument("--config", default="synth_small")
    ap.add_argument("--data", required=True, help="the training persons' shards (data.url)")
    ap.add_argument("--persons-data", default=None, help="the persons' shards, when not --data's")
    ap.add_argument("--split", default="test", help="the persons' split")
    ap.add_argument("--label", required=True, help="val, test or fresh: val applies the decision rule")
    ap.add_argument("--candidates", default=",".join(CANDIDATES))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    out = Path(args.out)
    path = out / f"protocol-{args.label}.json"
    rows = json.loads(path.read_text()) if path.is_file() else {}
    for name in args.candidates.split(","):
        t0 = time.perf_counter()
        rows[name] = evaluate(name, CANDIDATES[name], args)
        rows[name]["wall_seconds"] = time.perf_counter() - t0
        path.write_text(json.dumps(rows, indent=1))
        print(f"{args.label} {name}: " + ", ".join(
            f"{s} {rows[name][s]['vs_flip_tested']['gain_mean'] * 100:+.2f} ± "
            f"{rows[name][s]['vs_flip_tested']['gain_se'] * 100:.2f}" for s in SCENARIOS)
            + f" ({rows[name]['wall_seconds'] / 60:.1f} min)", flush=True)
    md = markdown(rows, args.label)
    if args.label == "val":
        md += "\n\nDecision rule (docs/protocol.md):\n" + "\n".join(f"- {line}" for line in verdict(rows))
    (out / f"protocol-{args.label}.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
