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

from client.ttp_job import run_ttp
from model.checkpoint import load_checkpoint
from model.config import load_config
from model.io import join, read_bytes
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
# Issue 37's structured updates, each applied to one full candidate (`--structured-on`): `NAME/rank4` etc.
STRUCTURED = {"rank4": ["ttp.delta_rank=4"], "rank8": ["ttp.delta_rank=8"],
              "norm+bias": ["ttp.norm_and_bias_only=true"]}
DEFAULT = "default"
LOSS = -0.01  # a person worse by more than one point


def evaluate(overrides: list[str], args) -> dict:
    """One candidate on the persons: its gains in both scenarios against both references."""
    cfg = load_config(args.config, [f"data.url={args.data}", "model.flip_test=true", f"data.test_split={args.split}",
                                    *args.overrides, *overrides])
    exp = Experiment(cfg, Path(args.out), args.seeds, variants=("transformer",), eval_data=args.persons_data)
    seeds = range(args.seeds)
    runs = [("transformer", s, scenario) for s in seeds for scenario in SCENARIOS] + [
        ("transformer", s, "none", "", (), flip) for s in seeds for flip in (True, False)]
    compute_in_parallel(exp, runs, args.jobs)
    flip = [exp.evaluation("transformer", s, "none", flip_test=True) for s in seeds]
    plain = [exp.evaluation("transformer", s, "none", flip_test=False) for s in seeds]
    row = {"overrides": overrides, "config": cfg.to_dict(), "persons": len(exp.test_persons()),
           **delta_size(exp, cfg),
           "flip_tested": float(np.mean([r[exp.metric] for e in flip for r in e["persons"]])),
           "plain": float(np.mean([r[exp.metric] for e in plain for r in e["persons"]]))}
    for scenario in SCENARIOS:
        evals = [exp.evaluation("transformer", s, scenario) for s in seeds]
        row[scenario] = {"vs_flip_tested": gain_summary(list(zip(flip, evals)), exp.metric),
                         "vs_plain": gain_summary(list(zip(plain, evals)), exp.metric),
                         "per_person": gains_per_person(list(zip(flip, evals)), exp.metric),
                         "seconds_per_person": float(np.mean([e["seconds"] / len(e["persons"]) for e in evals]))}
    return row


def delta_size(exp: Experiment, cfg) -> dict:
    """The int8 delta a client would file for the first person (seed-0 model, offline), in bytes and as a share of
    the checkpoint's weights file."""
    path = str(exp.model_path("transformer", 0))
    pid, frames = next(iter(exp.test_persons().items()))
    data, metrics, _ = run_ttp(load_checkpoint(path), frames, "offline", cfg.ttp, 0, pid, "int8", device="cpu")
    weights = len(read_bytes(join(path, "model.safetensors")))
    return {"delta_bytes": len(data), "delta_share": len(data) / weights, "delta_tensors": metrics["delta_tensors"]}


def structured_verdict(rows: dict, full: str) -> list[str]:
    """Issue 37's rule: a structured update is kept as an option if in both scenarios its validation gain is
    within one clustered standard error of the full update's (or above it)."""
    lines = []
    for name in (n for n in rows if n.startswith(f"{full}/")):
        kept = all(rows[name][s]["vs_flip_tested"]["gain_mean"] >= rows[full][s]["vs_flip_tested"]["gain_mean"]
                   - rows[full][s]["vs_flip_tested"]["gain_se"] for s in SCENARIOS)
        lines.append(f"{name}: delta {rows[name]['delta_bytes']} bytes ({rows[name]['delta_share'] * 100:.2f} % of the "
                     f"checkpoint, full: {rows[full]['delta_share'] * 100:.2f} %); "
                     + ("kept as an option" if kept else "not kept") + " (within one standard error of the full "
                     "update's gain in both scenarios" + ("" if kept else ": no") + ")")
    return lines


def verdict(rows: dict) -> list[str]:
    """The protocol's decision rule (validation persons only)."""
    def losers(name):
        return sum(rows[name][s]["vs_flip_tested"]["persons_worse_1pck_over_seeds"] for s in SCENARIOS)

    def score(name):
        return float(np.mean([rows[name][s]["vs_flip_tested"]["gain_mean"] for s in SCENARIOS]))

    candidates = [name for name in rows if name in CANDIDATES]  # the structured updates are issue 37's question
    eligible = [name for name in candidates if losers(name) == 0]
    winner = max(eligible, key=score) if eligible else min(candidates, key=lambda n: (losers(n), -score(n)))
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
             "worst person off / on | persons losing > 1 off / on | s per person off / on | delta (int8) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in rows.items():
        off, on = (row[s]["vs_flip_tested"] for s in SCENARIOS)
        lines.append(f"| {name} | {cell(off)} | {cell(on)} | {cell(row['offline']['vs_plain'])} | "
                     f"{cell(row['online']['vs_plain'])} | {off['person_gain_min'] * 100:+.1f} / "
                     f"{on['person_gain_min'] * 100:+.1f} | {off['persons_worse_1pck_over_seeds']} / "
                     f"{on['persons_worse_1pck_over_seeds']} of {off['persons']} | "
                     f"{row['offline']['seconds_per_person']:.1f} / {row['online']['seconds_per_person']:.1f} | "
                     f"{row['delta_bytes'] / 1e3:.1f} kB ({row['delta_share'] * 100:.2f} %) |")
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
    ap.add_argument("--structured-on", default="", help="also run issue 37's structured updates of this candidate")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="applied to every candidate, before its own flags (a smaller scale, say)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    out = Path(args.out)
    path = out / f"protocol-{args.label}.json"
    rows = json.loads(path.read_text()) if path.is_file() else {}
    todo = {name: CANDIDATES[name] for name in args.candidates.split(",") if name}
    if args.structured_on:
        todo.update({f"{args.structured_on}/{name}": CANDIDATES[args.structured_on] + flags
                     for name, flags in STRUCTURED.items()})
    for name, overrides in todo.items():
        t0 = time.perf_counter()
        rows[name] = evaluate(overrides, args)
        rows[name]["wall_seconds"] = time.perf_counter() - t0
        path.write_text(json.dumps(rows, indent=1))
        print(f"{args.label} {name}: " + ", ".join(
            f"{s} {rows[name][s]['vs_flip_tested']['gain_mean'] * 100:+.2f} ± "
            f"{rows[name][s]['vs_flip_tested']['gain_se'] * 100:.2f}" for s in SCENARIOS)
            + f" ({rows[name]['wall_seconds'] / 60:.1f} min)", flush=True)
    md = markdown(rows, args.label)
    if args.label == "val":
        md += "\n\nDecision rule (docs/protocol.md):\n" + "\n".join(f"- {line}" for line in verdict(rows))
    for full in sorted({name.split("/")[0] for name in rows if "/" in name}):
        md += f"\n\nStructured updates of {full} (issue 37's rule):\n" + "\n".join(
            f"- {line}" for line in structured_verdict(rows, full))
    (out / f"protocol-{args.label}.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
