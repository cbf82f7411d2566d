"""Serving latency, throughput and memory of `posettp serve` (1 PoseModel replica, real Ray, real HTTP).

warm: one person's model cached, sequential requests on a keep-alive connection (client-side p50/p99,
      and the server's own latency_ms);
cold: first request of a person whose delta is not cached (>= 200 persons cycling through an LRU of 16:
      every request loads latest.json + the delta, validates and applies it; the base stays cached);
throughput: N concurrent keep-alive clients on 3 warm persons;
memory: PoseModel replica RSS after the first persons, after 16, after 200 and after every person once (by distinct
        persons served: it must stay bounded by the LRU, not grow with persons), and after each cold round.

Run: .venv/bin/python -m bench.serve_latency [--persons 200 --lru 16 --image-size 64 --auth] [--num-gpus 1]
     [--config configs/synth_paper.yaml] [--flip-test]
(--num-gpus > 0: the PoseModel replica holds that share of a GPU and runs the model on CUDA)
"""
import argparse
import http.client
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine  # noqa: E402
from model.checkpoint import load_checkpoint  # noqa: E402
from model.predict import predict_crops  # noqa: E402
from server.auth import add_token  # noqa: E402
from store.deltas import DeltaStore  # noqa: E402
from store.policy import DeltaPolicy  # noqa: E402
from tests.fixtures_serve import (ServeProcess, make_checkpoint, make_delta, make_image,  # noqa: E402
                                  session_processes, write_serve_config)


def pct(values, q):
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


class Client:
    def __init__(self, port: int, tokens: dict | None):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.tokens = tokens or {}

    def pose(self, pid: str, body: bytes) -> tuple[float, dict]:
        headers = {"Content-Type": "image/png"}
        if pid in self.tokens:
            headers["Authorization"] = f"Bearer {self.tokens[pid]}"
        t0 = time.perf_counter()
        self.conn.request("POST", f"/v1/persons/{pid}/pose", body, headers)
        r = self.conn.getresponse()
        data = r.read()
        ms = (time.perf_counter() - t0) * 1e3
        if r.status != 200:
            raise RuntimeError(f"{pid}: {r.status} {data[:200]!r}")
        return ms, json.loads(data)

    def get(self, path: str) -> dict:
        self.conn.request("GET", path)
        r = self.conn.getresponse()
        return json.loads(r.read())


def session_rss_mb(sid: int) -> float:
    total = 0
    for pid in session_processes(sid):
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def run(args) -> dict:
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="pst-bench-"))
    ck, store = str(root / "ck"), str(root / "store")
    make_checkpoint(ck, image_size=args.image_size, config=args.config)
    base = load_checkpoint(ck)
    st = DeltaStore(store, DeltaPolicy.for_checkpoint(base))
    persons = [f"p{i:04d}" for i in range(args.persons)]
    t0 = time.time()
    for i, pid in enumerate(persons):
        st.file_delta(pid, make_delta(base.model, base.sha256, pid, seed=i, dtype="int8"))
    setup_s = time.time() - t0
    tokens = {pid: add_token(str(root / "store/auth/tokens.json"), pid) for pid in persons} if args.auth else None
    size = args.image_size or base.config.model.image_size
    body = make_image(1, args.request_size, args.request_size)  # the frame sent (cropped to the model's size)

    # pure model forward (no HTTP, no Ray) for reference, on the replica's device
    base.model.to("cuda" if args.num_gpus > 0 else "cpu")
    base.model.cfg.flip_test = args.flip_test
    crop = torch.rand(1, 3, size, size)
    mat = np.tile(np.array([[1.0, 0, 0], [0, 1.0, 0]]), (1, 1, 1))
    for _ in range(5):
        predict_crops(base.model, crop, mat)
    fw = []
    for _ in range(50):
        t = time.perf_counter()
        predict_crops(base.model, crop, mat)
        fw.append((time.perf_counter() - t) * 1e3)

    config = write_serve_config(str(root / "serve.yaml"), replicas=1, num_cpus=1, lru_size=args.lru, ttl_s=2.0,
                                batch_size=8, batch_wait_ms=args.batch_wait_ms, auth=bool(args.auth),
                                colocate=args.colocate, num_gpus=args.num_gpus, flip_test=args.flip_test)
    proc = ServeProcess(ck, store, config, str(root / "serve.log"))
    out = {"machine": machine(), "config": args.config, "num_gpus": args.num_gpus, "image_size": size,
           "persons": args.persons, "lru": args.lru, "replicas": 1, "auth": bool(args.auth), "colocate": args.colocate,
           "flip_test": args.flip_test,
           "batch_wait_ms": args.batch_wait_ms, "request_size": args.request_size, "delta_setup_s": round(setup_s, 1),
           "forward_ms_p50_in_process": round(statistics.median(fw), 2)}
    try:
        t0 = time.time()
        proc.wait_ready()
        out["startup_s"] = round(time.time() - t0, 1)
        c = Client(proc.port, tokens)
        h = c.get("/healthz")
        out.update(rss_mb_start=round(h["rss_bytes"] / 2**20, 1), replica_device=h["device"])

        # warm
        warm_pid = persons[0]
        for _ in range(args.warmup):
            c.pose(warm_pid, body)
        client_ms, server_ms = [], []
        for _ in range(args.requests):
            ms, ans = c.pose(warm_pid, body)
            client_ms.append(ms)
            server_ms.append(ans["latency_ms"])
        out.update(warm_p50_ms=round(pct(client_ms, 50), 2), warm_p99_ms=round(pct(client_ms, 99), 2),
                   warm_server_p50_ms=round(pct(server_ms, 50), 2))

        # memory after a few and after LRU-many persons
        for pid in persons[:args.lru]:
            c.pose(pid, body)
        h = c.get("/healthz")
        out.update(rss_mb_after_lru_persons=round(h["rss_bytes"] / 2**20, 1),
                   cached_persons_after_lru=h["cached_persons"],
                   person_mb=round(h["cached_bytes"] / max(h["cached_persons"], 1) / 2**20, 3))

        # cold: cycle through all persons (each request misses the LRU), a few rounds; RSS after each, and in the
        # first round after 200 and after all distinct persons
        cold_ms, rss_rounds = [], []
        rss_by_persons = {args.lru: out["rss_mb_after_lru_persons"]}
        for r in range(args.rounds):
            for i, pid in enumerate(persons[args.lru:] + persons[:args.lru]):
                ms, ans = c.pose(pid, body)
                assert ans["model_version"] != "base", ans
                cold_ms.append(ms)
                distinct = args.lru + i + 1
                if r == 0 and (distinct == 200 or distinct == len(persons)):
                    rss_by_persons[distinct] = round(c.get("/healthz")["rss_bytes"] / 2**20, 1)
            rss_rounds.append(round(c.get("/healthz")["rss_bytes"] / 2**20, 1))
        out["rss_mb_by_distinct_persons"] = rss_by_persons
        out["rss_mb_after_each_round"] = rss_rounds
        h = c.get("/healthz")
        out.update(cold_p50_ms=round(pct(cold_ms, 50), 2), cold_p99_ms=round(pct(cold_ms, 99), 2),
                   cold_requests=len(cold_ms), rss_mb_after_all_persons=round(h["rss_bytes"] / 2**20, 1),
                   cached_persons_after_all=h["cached_persons"],
                   cached_mb_after_all=round(h["cached_bytes"] / 2**20, 2))
        info_ans = c.get(f"/v1/persons/{persons[-1]}") if not args.auth else None
        if info_ans:
            out["person_memory_bytes"] = info_ans["memory_bytes"]
            out["person_load_ms_server"] = info_ans["load_ms"]

        # throughput: concurrent clients on 3 warm persons
        hot = persons[:3]
        for pid in hot:
            c.pose(pid, body)
        done, errors = [0], []
        lock = threading.Lock()
        stop_at = time.time() + args.seconds

        def worker(k):
            cl = Client(proc.port, tokens)
            n = 0
            try:
                while time.time() < stop_at:
                    cl.pose(hot[(k + n) % 3], body)
                    n += 1
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc))
            with lock:
                done[0] += n

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(args.clients)]
        t0 = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out.update(throughput_rps=round(done[0] / (time.time() - t0), 1), throughput_clients=args.clients,
                   throughput_errors=len(errors))
        out["session_rss_mb_all_ray_processes"] = round(session_rss_mb(proc.proc.pid), 1)
    finally:
        rc = proc.stop()
        out["shutdown_rc"] = rc
        out["leftover_processes"] = len(proc.leftovers())
        proc.kill_leftovers()
        shutil.rmtree(proc.temp_dir, ignore_errors=True)
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    out["targets"] = {"warm_p50_le_30ms": out.get("warm_p50_ms", 1e9) <= 30,
                      "cold_p50_le_150ms": out.get("cold_p50_ms", 1e9) <= 150}
    return out


def markdown(r: dict) -> str:
    rows = [("warm p50 / p99 (client, ms)", f"{r['warm_p50_ms']} / {r['warm_p99_ms']}"),
            ("warm p50 (server latency_ms)", r["warm_server_p50_ms"]),
            ("model forward alone p50 (ms)", r["forward_ms_p50_in_process"]),
            ("cold p50 / p99 (ms, delta not cached)", f"{r['cold_p50_ms']} / {r['cold_p99_ms']}"),
            (f"requests/s, 1 replica, {r['throughput_clients']} clients", r["throughput_rps"]),
            ("replica RSS MB: start / after LRU / after all persons",
             f"{r['rss_mb_start']} / {r['rss_mb_after_lru_persons']} / {r['rss_mb_after_all_persons']}"),
            ("cached persons after all / MB per person", f"{r['cached_persons_after_all']} / {r['person_mb']}")]
    where = " on a GPU" if r["num_gpus"] else ""
    head = (f"| {Path(r['config']).stem} {r['image_size']}px{where}, {r['request_size']}px frames, "
            f"{r['persons']} persons, LRU {r['lru']}"
            f"{', colocated' if r['colocate'] else ''} | |")
    return "\n".join([head,
                      "| --- | --- |"] + [f"| {a} | {b} |" for a, b in rows])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/synth_small.yaml", help="the served model's config (untrained)")
    p.add_argument("--persons", type=int, default=200)
    p.add_argument("--lru", type=int, default=16)
    p.add_argument("--image-size", type=int, default=None, help="model input size (synth_small native: 64)")
    p.add_argument("--request-size", type=int, default=128, help="side of the PNG frame each request sends")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=3, help="cold rounds through all persons")
    p.add_argument("--batch-wait-ms", type=float, default=0.0)
    p.add_argument("--auth", action="store_true")
    p.add_argument("--colocate", action="store_true", help="one deployment (ingress holds the models)")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPU share of the PoseModel replica")
    p.add_argument("--flip-test", action="store_true", help="serve with flip_test: true (twice the pose passes)")
    p.add_argument("--keep", action="store_true")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=2))
    print(markdown(result), file=sys.stderr)


if __name__ == "__main__":
    main()
