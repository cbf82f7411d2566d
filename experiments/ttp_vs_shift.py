"""How the TTP gain depends on how far the test persons are from the training persons.

TTP exists for persons unlike the training set, and `synth_small`'s test persons sit at one appearance shift
(0.3). This re-scores a finished `posettp reproduce` run's models on the *same* test persons rendered at other
shift strengths (`posettp synth --split test`: motions and cameras do not depend on the strength; clothing,
backgrounds and body proportions do, so the joints move by the proportions' change, under a pixel), without TTP,
online and offline, with the run's own TTP settings. Training persons are never shifted, so the models stay valid; the run's own strength reads the run's
cached evaluations. `--components` shifts only some parts of the look (`posettp synth --shift-components`), to
see which kind of shift TTP can undo.

Run: .venv/bin/python -m experiments.ttp_vs_shift --run OUT_OF_REPRODUCE --shifts 0,0.3,0.5,0.7 --out DIR [--jobs 2]
     [--components clothing,body,background]
"""
from __future__ import annotations

import argparse
import json
import time
from argparse import Namespace
from pathlib import Path

import numpy as np

from data.shards import read_manifest
from data.synth import main as synth_main
from data.synth.look import Shift
from model.config import from_dict
from training.reproduce import Experiment, compute_in_parallel, gain_summary, paired

SCENARIOS = ("online", "offline")
ALL_COMPONENTS = "clothing,body,background"


def suffix(components: str) -> str:
    """File-name suffix of a partial shift: `-clothing+body`; nothing when every component shifts."""
    shifted = [name for name, on in Shift.profile_of(components).as_dict().items() if on]
    return "" if len(shifted) == len(Shift.__dataclass_fields__) else "-" + "+".join(shifted)


def level_name(shift: float, components: str) -> str:
    return f"shift-{shift:g}{suffix(components)}"


def shifted_test_persons(run_cfg, shift: float, out: Path, components: str = ALL_COMPONENTS) -> str:
    """The run's test persons at another shift strength (written once, then reused)."""
    manifest = read_manifest(run_cfg.data.url)
    gen = manifest["generator"]
    if shift == gen["shift"] and Shift.profile_of(components).as_dict() == gen["shift_profile"]:
        return run_cfg.data.url
    url = out / "data" / level_name(shift, components)
    if not (url / "manifest.json").is_file():
        synth_main(Namespace(out=str(url), persons=manifest["splits"]["test"]["persons"],
                             frames=gen["frames_per_video"], size=gen["size"], seed=gen["seed"], shift=shift,
                             shift_components=components, split="test", videos=gen["videos"], extra_frames=0))
    return str(url)


def level(run: Path, run_cfg, shift: float, components: str, out: Path, seeds: int, jobs: int) -> Experiment:
    """An Experiment whose models are the run's and whose test persons are rendered at `shift`."""
    url = shifted_test_persons(run_cfg, shift, out, components)
    if url == run_cfg.data.url:
        where = run
    else:
        where = out / level_name(shift, components)
        where.mkdir(parents=True, exist_ok=True)
        if not (where / "models").exists():
            (where / "models").symlink_to((run / "models").resolve(), target_is_directory=True)
    cfg = from_dict(run_cfg.to_dict())
    cfg.data.url = url
    # worker=True: the models were checked and the config recorded by the run that made them; this script
    # records its own below
    exp = Experiment(cfg, where, seeds, worker=True, variants=("baseline", "transformer"))
    runs = [("baseline", s, "none") for s in range(seeds)] + [
        ("transformer", s, scenario) for s in range(seeds) for scenario in ("none", *SCENARIOS)]
    compute_in_parallel(exp, runs, jobs)
    return exp


def summarize(exp: Experiment, seeds: int) -> dict:
    evals = {(v, s, sc): exp.evaluation(v, s, sc) for s in range(seeds)
             for v, sc in [("baseline", "none"), ("transformer", "none")] + [("transformer", x) for x in SCENARIOS]}

    def mean_pck(variant):
        return float(np.mean([np.mean([r["pck@0.2"] for r in evals[variant, s, "none"]["persons"]])
                              for s in range(seeds)]))

    row = {"baseline": mean_pck("baseline"), "transformer": mean_pck("transformer")}
    for scenario in SCENARIOS:
        runs = [evals["transformer", s, scenario] for s in range(seeds)]
        pairs = [(evals["transformer", s, "none"], run) for s, run in enumerate(runs)]
        summary = gain_summary(pairs, "pck@0.2")  # its standard error is clustered by person
        row[scenario] = {**summary, "per_seed": [float(paired(*p, "pck@0.2").mean()) for p in pairs],
                         "worst": summary["pair_gain_min"],
                         "guard_events": int(sum(r["ttp"]["guard_events"] for run in runs for r in run["persons"]))}
    return row


def markdown(rows: dict) -> str:
    lines = ["| shift | baseline | transformer w/o TTP | online TTP gain | offline TTP gain |",
             "| --- | --- | --- | --- | --- |"]
    for shift, r in rows.items():
        gains = [f"{r[s]['gain_mean'] * 100:+.2f} ± {r[s]['gain_se'] * 100:.2f} ({r[s]['persons_worse_1pck']} "
                 f"lose > 1, worst {r[s]['worst'] * 100:+.1f})" for s in SCENARIOS]
        lines.append(f"| {shift:g} | {r['baseline'] * 100:.1f} | {r['transformer'] * 100:.1f} | " + " | ".join(gains)
                     + " |")
    return "\n".join(lines)


def plot(rows: dict, png: Path, components: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shifts = list(rows)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(shifts, [rows[s]["baseline"] * 100 for s in shifts], "o-", label="baseline")
    left.plot(shifts, [rows[s]["transformer"] * 100 for s in shifts], "o-", label="transformer w/o TTP")
    left.plot(shifts, [(rows[s]["transformer"] + rows[s]["offline"]["gain_mean"]) * 100 for s in shifts], "o--",
              label="transformer, offline TTP")
    left.set_xlabel(f"shift of the test persons ({components})")
    left.set_ylabel("PCK@0.2 (%)")
    left.legend(fontsize=8)
    for scenario in SCENARIOS:
        right.errorbar(shifts, [rows[s][scenario]["gain_mean"] * 100 for s in shifts],
                       yerr=[rows[s][scenario]["gain_se"] * 100 for s in shifts], marker="o", capsize=3,
                       label=f"{scenario} TTP")
    right.axhline(0, color="k", lw=0.5)
    right.set_xlabel(f"shift of the test persons ({components})")
    right.set_ylabel("paired gain over no TTP (PCK@0.2 points)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a `posettp reproduce` --out with models/ and config.json")
    ap.add_argument("--shifts", default="0,0.3,0.5,0.7")
    ap.add_argument("--components", default=ALL_COMPONENTS, help="which parts of the look shift")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    run, out = Path(args.run), Path(args.out)
    run_cfg = from_dict(json.loads((run / "config.json").read_text()))
    out.mkdir(parents=True, exist_ok=True)
    name = f"ttp_vs_shift{suffix(args.components)}"
    (out / f"{name}_config.json").write_text(json.dumps({"run": str(run), "run_config": run_cfg.to_dict(),
                                                         "shifts": args.shifts, "components": args.components,
                                                         "seeds": args.seeds}, indent=2))
    t0 = time.perf_counter()
    rows = {}
    for shift in sorted(float(s) for s in args.shifts.split(",")):
        rows[shift] = summarize(level(run, run_cfg, shift, args.components, out, args.seeds, args.jobs), args.seeds)
        print(f"{level_name(shift, args.components)}: {json.dumps(rows[shift])}", flush=True)
    plot(rows, out / f"{name}.png", args.components)
    md = markdown(rows)
    (out / f"{name}.md").write_text(md + "\n")
    (out / f"{name}.json").write_text(json.dumps({str(k): v for k, v in rows.items()}, indent=2))
    print(md)
    print(f"\nttp_vs_shift: {(time.perf_counter() - t0) / 60:.1f} min wall; outputs in {out}")


if __name__ == "__main__":
    main()
