"""Find and stop every process a command tree started, by an environment marker, never by name.

Ray, Flower and Serve start detached helpers (raylets, a SuperLink, workers) that
outlive their parent; they all inherit the environment, so a unique marker
variable finds exactly ours and nobody else's.
"""
from __future__ import annotations

import os
import signal
import time


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
