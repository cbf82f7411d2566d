"""`python -m bench.scale`: what one Serve replica, one Flower round and a two-node Ray cluster hold, on this machine.

1. Serve at a thousand persons (`bench.serve_latency` with --persons 1000): warm and cold latency, requests/s, and
   the PoseModel replica's RSS after 16, 200 and 1,000 distinct persons (bounded by the LRU, not by persons).
   Then two PoseModel replicas: a hot set of 1.5 x one replica's LRU, cycled; Serve's multiplexed routing sends
   each person to the replica that caches it, so the cache-hit ratio stays near 1 where routing without regard to
   the person would make both replicas cycle through every person and miss.
2. A Flower simulation of 50 persons in one round (`bench.flower_round`): wall time, peak RSS of all its
   processes, persons per hour, deltas stored.
3. Ray across two nodes (`bench.multinode`): Train workers on both, the second node killed mid-run, the run
   resumed from its last checkpoint.

Writes bench/scale.json. Run: .venv/bin/python -m bench.scale [--persons 1000] [--fl-persons 50]
[--parts deltas,serve,replicas,fl,ray]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import flower_round, serve_latency
from bench.common import machine
from model.checkpoint import load_checkpoint, state_bytes
from model.config import load_config
from model.network import build_model
from store.deltas import DeltaStore
from store.policy import DeltaPolicy
from tests.fixtures_serve import ServeProcess, make_checkpoint, make_delta, make_image, write_serve_config

OUT = Path("bench/scale.json")
PARTS = ("deltas", "serve", "replicas", "fl", "ray")


def delta_bytes(configs=("synth_small", "synth_paper", "penn_res50")) -> dict:
    """Bytes of a full (encoder + self-head) delta in each dtype, and of the checkpoint's weights, per config:
    measured by encoding a perturbed copy of each untrained model (sizes do not depend on training)."""
    out = {}
    for name in configs:
        cfg = load_config(name)
        model = build_model(cfg.model)
        sizes = {dtype: len(make_delta(model, "0" * 64, "p0", seed=0, dtype=dtype))
                 for dtype in ("fp32", "fp16", "int8")}
        out[name] = {"checkpoint_bytes": len(state_bytes(model)), **{f"delta_{k}_bytes": v for k, v in sizes.items()},
                     "params": sum(p.numel() for p in model.parameters())}
    return out


def replica_loads(client: serve_latency.Client, replicas: int, tries: int = 200) -> dict[str, int]:
    """{replica id: person models it has built}, asking /healthz (routed to any replica) until all answered."""
    seen: dict[str, int] = {}
    for _ in range(tries):
        h = client.get("/healthz")
        seen[h["replica"]] = h["person_loads"]
        if len(seen) == replicas:
            return seen
    raise RuntimeError(f"only {len(seen)} of {replicas} replicas answered /healthz in {tries} tries")


def two_replica_hit_ratio(lru: int = 16, rounds: int = 6) -> dict:
    """Cycle a hot set of 1.5 x LRU persons through 2 replicas; hits = requests that built no model."""
    root = Path(tempfile.mkdtemp(prefix="pst-scale-"))
    ck, store = str(root / "ck"), str(root / "store")
    make_checkpoint(ck)
    base = load_checkpoint(ck)
    st = DeltaStore(store, DeltaPolicy.for_checkpoint(base))
    hot = [f"h{i:03d}" for i in range(lru * 3 // 2)]
    for i, pid in enumerate(hot):
        st.file_delta(pid, make_delta(base.model, base.sha256, pid, seed=i, dtype="int8"))
    config = write_serve_config(str(root / "serve.yaml"), replicas=2, num_cpus=1, lru_size=lru, ttl_s=60.0, auth=False)
    proc = ServeProcess(ck, store, config, str(root / "serve.log"))
    body = make_image(1, 128, 128)
    try:
        proc.wait_ready()
        c = serve_latency.Client(proc.port, None)
        for pid in hot:  # first round: every person is built once, on the replica Serve picks for it
            c.pose(pid, body)
        before = replica_loads(c, 2)
        requests = 0
        for _ in range(rounds):
            for pid in hot:
                c.pose(pid, body)
                requests += 1
        after = replica_loads(c, 2)
    finally:
        proc.stop()
        proc.kill_leftovers()
        shutil.rmtree(proc.temp_dir, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
    loads = sum(after.values()) - sum(before.values())
    return {"serve_two_replica_hit_ratio": round(1 - loads / requests, 4), "two_replica_requests": requests,
            "two_replica_loads": loads, "two_replica_hot_persons": len(hot), "two_replica_lru": lru,
            "two_replica_loads_by_replica": after}


def fl_round(persons: int, checkpoint: str | None) -> dict:
    """One simulated Flower round of `persons` clients on fresh synthetic test persons."""
    tmp = Path(tempfile.mkdtemp(prefix="pst-scale-fl-"))
    data = str(tmp / "data")
    subprocess.run([sys.executable, "-m", "posettp.cli", "synth", "--out", data, "--persons", str(persons),
                    "--frames", "16", "--size", "64", "--seed", "7", "--split", "test"], check=True,
                   capture_output=True)
    if checkpoint is None:
        checkpoint = str(tmp / "ck")
        make_checkpoint(checkpoint)
    try:
        r = flower_round.run(checkpoint, data, persons=persons, ttp_steps=20)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"fl_persons": persons, "fl_wall_s": round(r["flower_run_wall_s"], 1),
            "fl_round_s": round(r["flower_round_s"], 1), "fl_peak_rss_mb": round(r["peak_rss_mb_flower_processes"]),
            "fl_deltas_stored": r["flower_stored"], "fl_verdicts": r["flower_verdicts"],
            "fl_persons_per_hour": round(persons / r["flower_run_wall_s"] * 3600),
            "fl_client_s_sum": round(r["flower_client_s_sum"], 1),
            "fl_round_overhead_pct": round(r["flower_round_overhead_pct"], 1)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--persons", type=int, default=1000, help="persons in the store of the one-replica run")
    p.add_argument("--fl-persons", type=int, default=50, help="clients in the simulated Flower round")
    p.add_argument("--checkpoint", default=None, help="a trained checkpoint for the Flower round (else untrained)")
    p.add_argument("--parts", default=",".join(PARTS),
                   help="which parts to run; the others keep their figures from an earlier run in bench/scale.json")
    a = p.parse_args(argv)
    parts = a.parts.split(",")
    if set(parts) - set(PARTS):
        p.error(f"--parts: choose from {','.join(PARTS)}")
    out: dict = json.loads(OUT.read_text()) if OUT.is_file() and set(parts) != set(PARTS) else {}
    out["machine"] = machine()
    measured = out.setdefault("measured_at", {})
    for part in parts:
        t0 = time.perf_counter()
        if part == "deltas":
            got = {"delta_bytes": delta_bytes()}
        elif part == "serve":
            r = serve_latency.run(serve_latency.parser().parse_args(["--persons", str(a.persons), "--rounds", "2"]))
            got = dict(serve_persons=a.persons, serve_lru=r["lru"], serve_rss_mb=r["rss_mb_by_distinct_persons"],
                       serve_warm_p50_ms=r["warm_p50_ms"], serve_warm_p99_ms=r["warm_p99_ms"],
                       serve_cold_p50_ms=r["cold_p50_ms"], serve_cold_p99_ms=r["cold_p99_ms"],
                       serve_rps=r["throughput_rps"], serve_cold_requests=r["cold_requests"],
                       serve_delta_setup_s=r["delta_setup_s"], serve_person_mb=r["person_mb"],
                       serve_rss_mb_after_each_cold_round=r["rss_mb_after_each_round"])
        elif part == "replicas":
            got = two_replica_hit_ratio()
        elif part == "fl":
            got = fl_round(a.fl_persons, a.checkpoint)
        else:
            from bench import multinode  # lazy: starts two Ray nodes

            got = multinode.run()
        out.update(got)
        measured[part] = {"at": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_s": round(time.perf_counter() - t0, 1)}
        print(f"[scale] {part} ({measured[part]['wall_s']:.0f} s): {json.dumps(got)}", flush=True)
    OUT.write_text(json.dumps(out, indent=2) + "\n")
    print(f"[scale] wrote {OUT}")


if __name__ == "__main__":
    main()
