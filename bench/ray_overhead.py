"""Ray Train overhead: images/s of the plain PyTorch loop vs the same loop in one Ray Train worker, in one run.

On a CUDA machine `--gpus 1` runs both on the GPU (the plain loop on cuda:0, the worker with one GPU over NCCL).

Both sides run the very same step (training/loop.py `train_step`) on the same batches
(training/data.py `batch_stream`, rank 0 of 1) with the same thread count (synth_small:
train.threads=1). Plain blocks and Ray runs alternate (plain, Ray, plain, Ray, plain) so load
drift on a shared machine hits both; rates come from median step times (the Ray worker reports
the median of each report window, the warm-up window dropped), in wall time and in process CPU
time (robust to other users' load). Reports (checkpoint + validation + barrier) are amortised
over the config's report_every; start-up is reported in seconds, apart.

Run:  .venv/bin/python -m bench.ray_overhead [--steps 30 --rounds 2] [--data URL] [--gpus 1] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from bench.common import machine
from model.config import load_config
from training.data import batch_stream, load_worker_frames
from training.loop import build_training, train_step

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/synth_small.yaml"


def plain_step_times(cfg, steps: int, warmup: int, device: str = "cpu") -> tuple[list[float], list[float]]:
    """The loop as a local run does it (no Ray, no DDP, this process): (wall, process CPU) seconds per step."""
    model, recon, optimizer = build_training(cfg, device)
    frames, _ = load_worker_frames(cfg.data.url, cfg.data.train_split, 0, 1)
    batches = batch_stream(frames, cfg, rank=0, start_step=0, pin_memory=device != "cpu")
    wall, cpu = [], []
    for step in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        train_step(model, recon, optimizer, next(batches), step, cfg)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall[warmup:], cpu[warmup:]


def ray_run(config: str, overrides: list[str], storage: str, name: str, steps: int, window: int, gpus: int = 0):
    """One Ray Train worker for `steps` steps, a report every `window`; returns (report rows, fit wall seconds)."""
    from training import joint

    args = SimpleNamespace(config=config, overrides=overrides + [f"train.max_steps={steps}",
                                                                 f"train.report_every={window}"],
                           workers=1, gpus=gpus, storage=storage, name=name, resume=False, max_failures=0)
    plan = joint.plan_run(args)
    t0 = time.perf_counter()
    joint.run_trainer(plan)
    wall = time.perf_counter() - t0
    rows = [r for r in joint.read_jsonl(f"{plan.run_url}/metrics.jsonl") if "loss" in r]
    return rows, wall


def run(steps: int = 30, warmup: int = 3, rounds: int = 2, data: str | None = None, gpus: int = 0) -> dict:
    """Plain and Ray alternate (plain, Ray, plain, Ray, ..., plain) so that load drift hits both sides."""
    tmp = Path(tempfile.mkdtemp(prefix="raytrain-bench-", dir="/tmp"))
    os.environ.setdefault("RAY_TMPDIR", str(tmp / "ray"))  # a private local Ray, never someone else's cluster
    os.environ.setdefault("RAY_ADDRESS", "local")
    (tmp / "ray").mkdir()
    if data is None:
        data = str(tmp / "synth")
        subprocess.run([sys.executable, "-m", "posettp.cli", "synth", "--out", data, "--persons", "10",
                        "--frames", "16", "--size", "128", "--seed", "0"], cwd=REPO, check=True,
                       capture_output=True)
    overrides = [f"data.url={data}"]
    base = load_config(CONFIG, overrides)
    bs, report_every_cfg = base.train.batch_size, base.train.report_every

    window = max(1, steps // 2)
    plain_wall, plain_cpu, ray_rows, walls = [], [], [], []
    for r in range(rounds + 1):
        w, c = plain_step_times(base, steps, warmup, "cuda:0" if gpus else "cpu")
        plain_wall += w
        plain_cpu += c
        if r < rounds:
            rows, wall = ray_run(CONFIG, overrides, str(tmp / "runs"), f"bench{r}", window * 3, window, gpus)
            ray_rows += rows[1:]  # the first window holds the warm-up steps
            walls.append((wall, rows))

    import ray

    ray.shutdown()
    plain_step, plain_cpu_step = statistics.median(plain_wall), statistics.median(plain_cpu)
    ray_step = statistics.median(r["step_s_median"] for r in ray_rows)
    ray_cpu_step = statistics.median(r["step_cpu_s_median"] for r in ray_rows)
    report_s = statistics.median(r["report_s"] for r in ray_rows if r["report_s"] > 0)
    startup = statistics.median(w - sum(r["step_s_median"] * window for r in rows) - len(rows) * report_s
                                for w, rows in walls)
    out = {
        "machine": machine(), "config": CONFIG, "device": "cuda" if gpus else "cpu", "batch_size": bs,
        "threads": base.train.threads,
        "image_size": base.model.image_size, "rounds": rounds, "plain_steps": len(plain_wall),
        "ray_windows": len(ray_rows), "window_steps": window,
        "plain_img_per_s": bs / plain_step,
        "ray_img_per_s": bs / ray_step,
        "ray_img_per_s_with_reports": bs / (ray_step + report_s / report_every_cfg),
        "plain_img_per_cpu_s": bs / plain_cpu_step,
        "ray_img_per_cpu_s": bs / ray_cpu_step,
        "report_every": report_every_cfg,
        "report_s_median": report_s,
        "startup_s_median": startup,
        "load_avg_1min": os.getloadavg()[0],
    }
    out["overhead_wall_pct"] = 100 * (1 - out["ray_img_per_s"] / out["plain_img_per_s"])
    out["overhead_wall_with_reports_pct"] = 100 * (1 - out["ray_img_per_s_with_reports"] / out["plain_img_per_s"])
    out["overhead_cpu_pct"] = 100 * (1 - out["ray_img_per_cpu_s"] / out["plain_img_per_cpu_s"])
    return out


def table(r: dict) -> str:
    return "\n".join([
        "| loop | images/s, wall (median step) | overhead | images per CPU-second | overhead |",
        "| --- | --- | --- | --- | --- |",
        f"| plain PyTorch | {r['plain_img_per_s']:.1f} | - | {r['plain_img_per_cpu_s']:.1f} | - |",
        f"| Ray Train, 1 worker ({r['device']}), between reports | {r['ray_img_per_s']:.1f} | "
        f"{r['overhead_wall_pct']:+.1f}% | "
        f"{r['ray_img_per_cpu_s']:.1f} | {r['overhead_cpu_pct']:+.1f}% |",
        f"| Ray Train, 1 worker, + a report every {r['report_every']} steps ({r['report_s_median']:.2f} s each) | "
        f"{r['ray_img_per_s_with_reports']:.1f} | {r['overhead_wall_with_reports_pct']:+.1f}% | | |",
        "",
        f"{CONFIG}: batch {r['batch_size']}, {r['image_size']} px, {r['threads']} thread(s); {r['machine']['cpu']}, "
        f"{r['machine']['cores']} cores, load average {r['load_avg_1min']:.1f}; plain and Ray alternated "
        f"({r['rounds']} Ray runs, {r['ray_windows']} windows of {r['window_steps']} steps; {r['plain_steps']} plain "
        f"steps); Ray start-up + teardown about {r['startup_s_median']:.0f} s per run, not in the rates"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed plain steps per block (after warm-up)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="Ray runs, alternated with rounds+1 plain blocks")
    p.add_argument("--data", default=None, help="dataset URL (default: a fresh `posettp synth` of 10 persons)")
    p.add_argument("--gpus", type=int, choices=(0, 1), default=0, help="1: both loops on the GPU")
    p.add_argument("--json", dest="json_out", default=None)
    a = p.parse_args()
    result = run(a.steps, a.warmup, a.rounds, a.data, a.gpus)
    print(table(result))
    print(json.dumps(result, indent=2))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
