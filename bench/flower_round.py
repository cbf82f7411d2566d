"""Flower round overhead: one simulated round (`flwr run`, N supernodes of 1 CPU) vs the TTP its clients did.

overhead = the server's round time - the clients' summed job seconds (load the base and the person's frames,
TTP, encode the delta) / the clients that can run at once (min(N, cores)): what a round costs beyond the
clients' own work (sending the base checkpoint, Ray actors, delta upload, validation and storage). Also the whole `flwr run` wall (SuperLink and Ray start-up
included) and the peak summed RSS of every Flower/Ray process of the run. The checkpoint is re-saved with the
safeguards that can skip adaptation off (`common.always_adapting`), so that every client computes and sends a
real delta.

Run: .venv/bin/python -m bench.flower_round --checkpoint CK --data SHARDS [--persons 4]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from core.checkpoints import model_with_loss
from model.checkpoint import load_checkpoint, save_checkpoint
from posettp.procs import MarkedTreeWatch, flower_env, stop_marked

from .common import always_adapting

REPO = Path(__file__).resolve().parents[1]


def run(checkpoint: str, data: str, persons: int = 4, ttp_steps: int = 20) -> dict:
    with tempfile.TemporaryDirectory(prefix="flb", dir="/tmp") as tmp:
        home, store, adapting = Path(tmp) / "flwr-home", Path(tmp) / "store", str(Path(tmp) / "checkpoint")
        ck = load_checkpoint(checkpoint)
        ck.config.ttp = always_adapting(ck.config.ttp)
        model, recon = model_with_loss(ck)
        save_checkpoint(adapting, model, ck.config, loss_module=recon)
        env = flower_env(home)
        run_config = (f'base-checkpoint="{adapting}" data="{data}" scenario="offline" storage="{store}" '
                      f"ttp-steps={ttp_steps} min-nodes={persons}")
        cmd = ["flwr", "run", ".", "--stream", "--run-config", run_config, "--federation-config",
               f"num-supernodes={persons} client-resources-num-cpus=1"]
        t0 = time.perf_counter()
        try:
            with MarkedTreeWatch("FLWR_HOME", str(home)) as rss:
                proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
        finally:
            stop_marked("FLWR_HOME", str(home))  # the simulation's detached SuperLink
        wall = time.perf_counter() - t0
        summaries = sorted((store / "fl-runs").glob("run-*.json"), key=lambda p: p.stat().st_mtime)
        if proc.returncode != 0 or not summaries:
            raise RuntimeError(f"flwr run failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
        summary = json.loads(summaries[-1].read_text())
    if summary.get("stored") != persons:
        raise RuntimeError(f"the round stored {summary.get('stored')} of {persons} deltas: {summary}")
    client_s = [p["metrics"]["seconds"] for p in summary["persons"].values()]  # a client's whole job
    round_s = summary["rounds"][0]["seconds"]
    parallel = min(persons, os.cpu_count() or 1)
    return {"flower_persons": persons, "flower_run_wall_s": wall, "flower_round_s": round_s,
            "flower_client_s_sum": sum(client_s),
            "flower_client_ttp_s_sum": sum(p["metrics"]["ttp_seconds"] for p in summary["persons"].values()),
            "flower_round_overhead_s": round_s - sum(client_s) / parallel,
            "flower_round_overhead_pct": (round_s / (sum(client_s) / parallel) - 1) * 100,
            "flower_delta_bytes_mean": summary["mean_delta_bytes"], "flower_stored": summary["stored"],
            "flower_verdicts": summary["rounds"][0]["verdicts"]["acknowledged"],
            "peak_rss_mb_flower_processes": rss.peak_mb}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--persons", type=int, default=4)
    a = p.parse_args()
    print(json.dumps(run(a.checkpoint, a.data, a.persons), indent=2))


if __name__ == "__main__":
    main()
