"""`make bench`: every benchmark in one run -> one markdown table + bench/results.json.

Accuracy-dependent entries (delta PCK, real-time PCK, online frames/s) need a
trained model: the demo's checkpoint and data are used when present
(`demo-out/`), otherwise a short synth_small training is made under bench/out.

Run: .venv/bin/python -m bench.run [--checkpoint CK --data URL] [--skip-paper] [--skip-serve] [--skip-flower]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from . import cuda, deltas, flower_round, forward, realtime, ttp_step
from .common import always_adapting, machine, peak_rss_mb

OUT = Path("bench")


def trained_model(checkpoint: str | None, data: str | None) -> tuple[str, str]:
    if checkpoint and data:
        return checkpoint, data
    demo = Path("demo-out")
    latest = demo / "runs" / "demo" / "latest.json"
    if latest.is_file():
        rec = json.loads(latest.read_text())
        return (rec.get("best") or rec)["checkpoint"], str(demo / "data")
    data = str(OUT / "out" / "data")
    ck = OUT / "out" / "ck"
    if not (Path(data) / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "posettp.cli", "synth", "--out", data, "--persons", "20",
                        "--frames", "30", "--size", "96"], check=True)
    if not (ck / "model.safetensors").is_file():
        from data.shards import load_frames
        from model.checkpoint import save_checkpoint
        from model.config import load_config
        from training.local import train_local

        cfg = load_config("configs/synth_small.yaml", [f"data.url={data}", "train.max_steps=300"])
        model, recon, _ = train_local(cfg, load_frames(data, split="train"))
        save_checkpoint(str(ck), model, cfg, 300, {}, recon)
    return str(ck), data


def online_and_offline(checkpoint: str, data: str, persons: int = 4) -> dict:
    """Online frames/s and offline s/person of the product step, and of the same step in fp32 with the standard
    layout (amp off, channels_last off) on the same persons: the speed ratio, and whether PCK is the same."""
    from core.checkpoints import model_with_loss
    from core.crops import prepare_frames
    from core.frames import labeled_person_frames
    from core.scoring import score
    from model.augment import Augmentation
    from model.checkpoint import load_checkpoint
    from model.joints import PENN  # the synthetic persons' joints
    from model.personalize import personalize

    ck = load_checkpoint(checkpoint)
    model, recon = model_with_loss(ck)
    steps = {"": always_adapting(ck.config.ttp)}
    steps["_fp32"] = replace(steps[""], amp="off", channels_last=False)
    augment = Augmentation.from_data(ck.config.data)  # the augmentation the model was trained with
    rows: dict[str, list] = {}
    for frames in list(labeled_person_frames(data, "test", persons).values()):
        crops, matrices, groups = prepare_frames(frames, ck.config.model.image_size)
        for suffix, ttp in steps.items():
            for scenario in ("online", "offline"):
                t0 = time.perf_counter()
                result = personalize(model, recon, crops, matrices, groups, ttp, scenario, augment=augment)
                seconds = time.perf_counter() - t0
                rows.setdefault(f"online_fps_small{suffix}" if scenario == "online" else
                                f"offline_s_per_person{suffix}", []).append(
                    len(frames) / seconds if scenario == "online" else seconds)
                rows.setdefault(f"ttp_pck_{scenario}{suffix}", []).append(score(result.predictions, frames,
                                                                                 PENN)["pck@0.2"])
    out = {k: float(np.median(v) if k.startswith(("online_fps", "offline_s")) else np.mean(v))
           for k, v in rows.items()}
    out["ttp_pck_max_abs_diff_vs_fp32_points"] = max(abs(out[f"ttp_pck_{s}_fp32"] - out[f"ttp_pck_{s}"]) * 100
                                             for s in ("online", "offline"))
    return out


def table(results: dict) -> str:
    rows = [(k, v) for k, v in results.items() if isinstance(v, (int, float))]
    m = results["machine"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}", "", "| metric | value |",
             "| --- | --- |"]
    lines += [f"| {k} | {v:,.3f} |" if isinstance(v, float) else f"| {k} | {v:,} |" for k, v in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint")
    ap.add_argument("--data")
    ap.add_argument("--skip-paper", action="store_true", help="skip paper-size ResNet-18 step timings")
    ap.add_argument("--skip-serve", action="store_true")
    ap.add_argument("--skip-flower", action="store_true", help="skip the simulated Flower round")
    args = ap.parse_args()
    torch.set_num_threads(2)
    res: dict = {"machine": machine()}
    res.update({k: v for k, v in forward.run().items() if k != "machine"})
    step = ttp_step.run(include_paper=not args.skip_paper)
    res.update({k: v for k, v in step.items() if isinstance(v, float)})
    for name in ("synth_small", "paper_resnet18"):
        for b, row in step.get(name, {}).items():
            res[f"ttp_step_ms_fast_{name}_b{b}"] = row["fast_ms"]
            res[f"ttp_step_ms_reference_{name}_b{b}"] = row["reference_ms"]
    ck, data = trained_model(args.checkpoint, args.data)
    res.update(online_and_offline(ck, data))
    rt = realtime.with_pck(ck, data, persons=4)
    res.update({k: v for k, v in rt.items() if isinstance(v, (int, float))})
    d = deltas.run(ck, data, persons=6, out_png=str(OUT / "delta_tradeoff.png"))
    int8 = d["methods"]["int8"]
    res.update(delta_bytes=int(int8["bytes"]), checkpoint_bytes=int(d["checkpoint_bytes"]),
               delta_ratio=int8["ratio"], delta_pck_drop=int8["pck_drop_points"])
    res["delta_methods"] = d["methods"]
    res.update(train_images_per_second())
    if not args.skip_serve:
        res.update(serve_numbers())
    if not args.skip_flower:
        res.update(flower_round.run(ck, data, persons=4))
    if torch.cuda.is_available():  # the GPU against this machine's CPU (bench/cuda.py)
        res["cuda"] = cuda.run(cpu_paper=False)["rows"]
    res["peak_rss_mb_bench"] = peak_rss_mb()
    (OUT / "results.json").write_text(json.dumps(res, indent=2, default=float))
    print(table(res))


def train_images_per_second() -> dict:
    """Plain PyTorch vs Ray Train (1 worker) images/s on synth_small, alternated in one run."""
    from .ray_overhead import run as ray_run

    r = ray_run(steps=20, rounds=1)
    return {"train_img_per_s_small": r["plain_img_per_s"], "train_img_per_s_ray_1worker": r["ray_img_per_s"],
            "ray_overhead_cpu_pct": (r["plain_img_per_cpu_s"] / r["ray_img_per_cpu_s"] - 1) * 100}


def serve_numbers() -> dict:
    from .serve_latency import parser
    from .serve_latency import run as serve_run

    r = serve_run(parser().parse_args(["--persons", "200", "--lru", "16", "--requests", "200"]))
    return {"serve_warm_p50_ms": r["warm_p50_ms"], "serve_warm_p99_ms": r["warm_p99_ms"],
            "serve_cold_p50_ms": r["cold_p50_ms"], "serve_rps": r["throughput_rps"],
            "serve_replica_rss_mb_after_all_persons": r["rss_mb_after_all_persons"]}


if __name__ == "__main__":
    main()
