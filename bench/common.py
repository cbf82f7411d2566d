"""Timing helpers shared by the bench scripts: medians over repeats, machine description."""
from __future__ import annotations

import dataclasses
import os
import platform
import resource
import statistics
import time

import torch


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}


def median_ms(fn, repeats: int = 7, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def always_adapting(ttp):
    """The TTP config with the safeguards that can skip adaptation turned off: a cost or delta-size measurement
    must time and compress real updates, not a person the pose-signal check or confidence guard left at base."""
    return dataclasses.replace(ttp, min_pose_signal=0.0, guard_confidence=0.0)
