"""Byte-level storage through fsspec URLs (`/path`, `file://`, `s3://`), with atomic writes.

s3:// endpoints come from the standard AWS variables (AWS_ENDPOINT_URL for an
S3-compatible server such as one on loopback).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import time
import uuid

import fsspec


TEMP_MARK = ".tmp-"  # what `write_bytes_atomic` puts in a temporary file's name


def filesystem(url: str):
    """(fs, path) for a URL; S3 picks up AWS_ENDPOINT_URL when set."""
    kwargs = {}
    if url.startswith("s3://") and os.environ.get("AWS_ENDPOINT_URL"):
        kwargs["client_kwargs"] = {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}
    fs, path = fsspec.core.url_to_fs(url, **kwargs)
    return fs, path


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *[p.strip("/") for p in parts]])


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return f.read()


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write to a temporary name then move into place, so readers never see half a file."""
    fs, path = filesystem(url)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}{TEMP_MARK}{uuid.uuid4().hex[:8]}"
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def remove_stale_temporaries(url: str, older_than_s: float = 3600.0) -> int:
    """Remove the temporary files that writers killed mid-write left in the folder `url`; returns how many.

    Only files older than `older_than_s` go: a live writer's temporary file is seconds old."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return 0
    removed = 0
    for info in fs.ls(path, detail=True):
        name = info["name"]
        mtime = info.get("mtime") or info.get("LastModified")
        if TEMP_MARK not in name.rsplit("/", 1)[-1] or mtime is None:
            continue
        age = time.time() - (mtime.timestamp() if hasattr(mtime, "timestamp") else float(mtime))
        if age > older_than_s:
            fs.rm(name)
            removed += 1
    return removed


@contextlib.contextmanager
def updating(url: str):
    """Hold an exclusive lock for a read-modify-write of `url` (a lock file beside it), so that concurrent writers
    on this machine's filesystems take turns instead of losing each other's change. Object stores (s3://) offer no
    lock: there the last writer wins."""
    fs, path = filesystem(url)
    if "file" not in fs.protocol:
        yield
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_writable(url: str) -> None:
    """Fail early (before any expensive work) when a storage URL cannot be written."""
    probe = join(url, f".write-probe-{uuid.uuid4().hex[:8]}")
    try:
        write_bytes_atomic(probe, b"ok")
        fs, path = filesystem(probe)
        fs.rm(path)
    except Exception as exc:  # any backend error means the same thing to the user
        raise PermissionError(f"storage {url} is not writable: {exc}") from exc


def _standard(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _standard(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_standard(v) for v in value]
    return value


def json_text(value, indent: int | None = 2) -> str:
    """Standard JSON for what users and other tools read: NaN and ±Inf become null (`json.dumps` writes `NaN`,
    which strict parsers refuse); numpy and torch scalars become numbers, anything else its str()."""
    plain = json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
    return json.dumps(_standard(plain), indent=indent, allow_nan=False)
