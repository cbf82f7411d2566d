"""Find and stop every process a command tree started, by an environment marker, never by name.

Ray, Flower and Serve start detached helpers (raylets, a SuperLink, workers) that
outlive their parent; they all inherit the environment, so a unique marker
variable finds exactly ours and nobody else's.
"""
from __future__ import annotations

import ipaddress
import os
import signal
import sys
import threading
import time
from pathlib import Path

from core.local_ray import LOOPBACK_ENV


def flower_env(home: Path | str, **extra: str) -> dict:
    """The environment of a local Flower/Ray run: its own FLWR_HOME (which also marks every process it starts,
    for `stop_marked` and `MarkedTreeWatch`), a local Ray on loopback, this venv's tools first, no telemetry, no
    update check, and no runtime dependency installation (it would download a CUDA torch)."""
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", RAY_ADDRESS="local",
               RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1", **LOOPBACK_ENV,
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


def listening_sockets(pids: list[int]) -> set[tuple[str, int, str]]:
    """(address, port, process name) of every TCP socket these processes listen on (IPv4-mapped IPv6
    addresses shown as IPv4)."""
    owner = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            with open(f"/proc/{pid}/comm") as f:
                name = f.read().strip()
        except OSError:  # the process ended, or is not ours to read
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                owner[link[8:-1]] = name
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            rows = [line.split() for line in f.read().splitlines()[1:]]
        for row in rows:
            if row[3] != "0A" or row[9] not in owner:  # 0A: LISTEN
                continue
            hex_addr, hex_port = row[1].split(":")
            raw = bytes.fromhex(hex_addr)  # 32-bit words in host (little-endian) order
            addr = ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
                addr = addr.ipv4_mapped
            found.add((str(addr), int(hex_port, 16), owner[row[9]]))
    return found


def exposed(sockets: set[tuple[str, int, str]]) -> set[tuple[str, int, str]]:
    """The sockets reachable from another machine: any address but loopback (wildcards included)."""
    return {s for s in sockets if not ipaddress.ip_address(s[0]).is_loopback}


class MarkedTreeWatch:
    """Samples every process marked key=value (a whole Flower/Ray tree) in a thread: `peak_mb` is the largest
    summed RSS seen, `sockets` every TCP socket any of them listened on."""

    def __init__(self, key: str, value: str, every: float = 0.5):
        self.key, self.value, self.every, self.peak_mb = key, value, every, 0.0
        self.sockets: set[tuple[str, int, str]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.is_set():
            total = 0
            pids = pids_with_env(self.key, self.value)
            for pid in pids:
                try:
                    with open(f"/proc/{pid}/statm") as f:
                        total += int(f.read().split()[1]) * page
                except OSError:  # the process ended between listing and reading
                    pass
            self.peak_mb = max(self.peak_mb, total / 2**20)
            self.sockets |= listening_sockets(pids)
            self._stop.wait(self.every)

    def __enter__(self) -> "MarkedTreeWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
