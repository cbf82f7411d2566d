"""Large images in a burst: 16 parallel requests of a 4096x4096 PNG (56 kB of zeros, 50 MB decoded) against one
`posettp serve`, while /healthz is polled. Prints the growth of the serving processes' RSS and the /healthz latency.

    python -m bench.serve_burst [--parallel 16 --side 4096 --rounds 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from tests.fixtures_serve import ServeProcess, make_checkpoint, session_processes, write_serve_config


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * 4096
        except OSError:
            pass
    return total / 2**20


def post(url: str, body: bytes) -> int:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "image/png"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def run(args) -> dict:
    root = Path(tempfile.mkdtemp(prefix="pst-burst-"))
    ck, store = str(root / "ck"), str(root / "store")
    make_checkpoint(ck)
    config = write_serve_config(str(root / "serve.yaml"), checkpoint=ck, store=store)
    server = ServeProcess(ck, store, config, str(root / "serve.log"))
    try:
        server.wait_ready()
        pids = session_processes(server.proc.pid)
        png = cv2.imencode(".png", np.zeros((args.side, args.side, 3), np.uint8))[1].tobytes()
        post(f"{server.url}/v1/persons/warm/pose", png)  # first request: imports, model load
        rss0 = rss_mb(pids)
        peak, health_ms, statuses, stop = [rss0], [], [], threading.Event()

        def watch():
            while not stop.is_set():
                t0 = time.perf_counter()
                with urllib.request.urlopen(f"{server.url}/healthz", timeout=60) as r:
                    r.read()
                health_ms.append((time.perf_counter() - t0) * 1e3)
                peak.append(rss_mb(pids))
                time.sleep(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.parallel) as pool:
            for _ in range(args.rounds):
                statuses += list(pool.map(lambda i: post(f"{server.url}/v1/persons/p{i}/pose", png),
                                          range(args.parallel)))
        wall = time.perf_counter() - t0
        stop.set()
        watcher.join()
        return {"parallel": args.parallel, "side": args.side, "rounds": args.rounds, "png_bytes": len(png),
                "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))}, "wall_s": round(wall, 2),
                "rss_before_mb": round(rss0, 1), "rss_growth_mb": round(max(peak) - rss0, 1),
                "healthz_p50_ms": round(statistics.median(health_ms), 1), "healthz_max_ms": round(max(health_ms), 1),
                "healthz_polls": len(health_ms)}
    finally:
        server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parallel", type=int, default=16)
    p.add_argument("--side", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=3)
    print(json.dumps(run(p.parse_args()), indent=1))


if __name__ == "__main__":
    main()
