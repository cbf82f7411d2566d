"""The per-person delta store: `{storage}/persons/{id}/deltas/{version}.safetensors` + `latest.json`.

A store is opened with the delta policy of its base checkpoint: `file_delta` checks a delta before anything
touches storage, and `load_latest` checks it again on the way out, because the store may have been tampered
with since.
"""
from __future__ import annotations

import hashlib
import json
import re
import time

from model import io
from model.delta import DeltaRejected

from .policy import DeltaPolicy, check_person_id


class DeltaStore:
    """One store URL (local path or fsspec URL such as s3://) bound to the policy its deltas must pass."""

    def __init__(self, url: str, policy: DeltaPolicy):
        self.url = url.rstrip("/")
        self.policy = policy

    def _person(self, person_id: str, *parts: str) -> str:
        return io.join(self.url, "persons", check_person_id(person_id), *parts)

    def file_delta(self, person_id: str, data: bytes) -> dict:
        """Check against the policy, then store atomically as a new version; returns its record, which latest.json
        holds unless a newer version landed meanwhile."""
        check_person_id(person_id)
        _, meta = self.policy.check(data, person_id)
        sha = hashlib.sha256(data).hexdigest()
        version = f"{int(time.time() * 1000):013d}-{sha[:8]}"
        io.remove_stale_temporaries(self._person(person_id, "deltas"))
        io.write_bytes_atomic(self._person(person_id, "deltas", f"{version}.safetensors"), data)
        record = {"person_id": person_id, "version": version, "base_sha256": self.policy.sha256, "sha256": sha,
                  "bytes": len(data), "dtype": meta.get("dtype"), "scenario": meta.get("scenario"),
                  "created_at": time.time()}
        latest = self._person(person_id, "latest.json")
        with io.updating(latest):  # two racing writers: latest.json only moves forward
            try:
                current = self.latest(person_id)
            except DeltaRejected:  # a damaged latest.json is replaced
                current = None
            if current is None or current["version"] < version:
                io.write_bytes_atomic(latest, json.dumps(record, indent=2).encode())
        return record

    def latest(self, person_id: str) -> dict | None:
        """The person's latest.json record, None when there is none; DeltaRejected when it is not a record."""
        url = self._person(person_id, "latest.json")
        if not io.exists(url):
            return None
        try:
            record = json.loads(io.read_bytes(url))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DeltaRejected(f"latest.json of person {person_id!r} is not JSON") from exc
        if not isinstance(record, dict) or not isinstance(record.get("version"), str):
            raise DeltaRejected(f"latest.json of person {person_id!r} is not a record naming a version")
        return record

    def read(self, person_id: str, version: str) -> bytes:
        if not re.fullmatch(r"[0-9]{13}-[0-9a-f]{8}", version):
            raise DeltaRejected(f"invalid delta version {version!r}")
        return io.read_bytes(self._person(person_id, "deltas", f"{version}.safetensors"))

    def load_latest(self, person_id: str):
        """(delta, meta, record) of the person's latest valid delta, or None when there is none.

        Raises DeltaRejected when the stored delta is corrupt, tampered or for another base.
        """
        record = self.latest(person_id)
        if record is None:
            return None
        data = self.read(person_id, record["version"])
        if hashlib.sha256(data).hexdigest() != record.get("sha256"):
            raise DeltaRejected(f"stored delta {record['version']} does not match its recorded sha256")
        delta, meta = self.policy.check(data, person_id)
        return delta, meta, record

    def persons(self) -> list[str]:
        fs, path = io.filesystem(io.join(self.url, "persons"))
        if not fs.exists(path):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
