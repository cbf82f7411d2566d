"""Find and stop every process a command tree started, by an environment marker, never by name.

Ray, Flower and Serve start detached helpers (raylets, a SuperLink, workers) that
outlive their parent; they all inherit the environment, so a unique marker
variable finds exactly ours and nobody else's.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path


def flower_env(home: Path | str, **extra: str) -> dict:
    """The environment of a local Flower/Ray run: its own FLWR_HOME (which also marks every process it starts,
    for `stop_marked` and `MarkedTreeRss`), a local Ray, this venv's tools first, no telemetry, no update
    check, and no runtime dependency installation (it would download a CUDA torch)."""
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", RAY_ADDRESS="local",
               RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("PYTHONPATH", None)
    env.update(extra)
    return env


def pids_with_env(key: str, value: str) -> list[int]:
    """Processes whose environment holds key=value (everything a marked tree started)."""
    needle = f"{key}={value}".encode()
    me, out = os.getpid(), []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    out.append(int(d))
        except OSError:
            continue
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def stop_pids(pids: list[int], grace: float = 10.0) -> None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL what is left."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    left = list(pids)
    while left and time.monotonic() < deadline:
        left = [p for p in left if alive(p)]
        time.sleep(0.2)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stop_marked(key: str, value: str, grace: float = 10.0) -> list[int]:
    pids = pids_with_env(key, value)
    stop_pids(pids, grace)
    return pids


class MarkedTreeRss:
    """Samples the summed RSS of every process marked key=value (a whole Flower/Ray tree) in a thread;
    `peak_mb` is the largest sum seen."""

    def __init__(self, key: str, value: str, every: float = 0.5):
        self.key, self.value, self.every, self.peak_mb = key, value, every, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.is_set():
            total = 0
            for pid in pids_with_env(self.key, self.value):
                try:
                    with open(f"/proc/{pid}/statm") as f:
                        total += int(f.read().split()[1]) * page
                except OSError:  # the process ended between listing and reading
                    pass
            self.peak_mb = max(self.peak_mb, total / 2**20)
            self._stop.wait(self.every)

    def __enter__(self) -> "MarkedTreeRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
