"""The per-person delta store: `{storage}/persons/{id}/deltas/{version}.safetensors` + `latest.json`.

Every writer (Flower server, `posettp personalize --store`) goes through
`file_delta`, which validates the delta against the base checkpoint before
anything touches storage; readers (Serve, evaluate) re-validate what they load,
because the store may have been tampered with since.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass

import torch

from model import io
from model.delta import DEFAULT_MAX_BYTES, DEFAULT_NORM_BOUND, DeltaRejected, decode_and_validate, deltable_keys
from model.network import PoseTTPNet

PERSON_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def check_person_id(person_id: str) -> str:
    if not isinstance(person_id, str) or not PERSON_ID.fullmatch(person_id) or person_id in (".", ".."):
        raise DeltaRejected(f"invalid person id {person_id!r}: must match [A-Za-z0-9_.-]{{1,64}}")
    return person_id


@dataclass
class BaseModelInfo:
    """What validation needs to know about the base checkpoint."""

    sha256: str
    state: dict[str, torch.Tensor]
    allowed_keys: set[str]

    @classmethod
    def from_model(cls, model: PoseTTPNet, sha256: str) -> "BaseModelInfo":
        state = model.state_dict()
        params = {n for n, _ in model.named_parameters()}
        return cls(sha256=sha256, state=state, allowed_keys=set(deltable_keys(state, params)))


class DeltaStore:
    def __init__(self, url: str, max_bytes: int = DEFAULT_MAX_BYTES, norm_bound: float = DEFAULT_NORM_BOUND,
                 max_abs: float = math.inf):
        """`norm_bound`, `max_abs`: what `decode_and_validate` holds every delta to."""
        self.url = url.rstrip("/")
        self.max_bytes = max_bytes
        self.norm_bound = norm_bound
        self.max_abs = max_abs

    def _person(self, person_id: str, *parts: str) -> str:
        return io.join(self.url, "persons", check_person_id(person_id), *parts)

    def validate(self, data: bytes, base: BaseModelInfo, person_id: str | None = None):
        delta, meta = decode_and_validate(data, base.state, base.allowed_keys, base.sha256,
                                          self.max_bytes, self.norm_bound, self.max_abs)
        if person_id is not None and meta.get("person_id") != person_id:
            raise DeltaRejected(f"delta is for person {meta.get('person_id')!r}, not {person_id!r}")
        return delta, meta

    def file_delta(self, person_id: str, data: bytes, base: BaseModelInfo) -> dict:
        """Validate, then store atomically as a new version; returns the new latest.json record."""
        check_person_id(person_id)
        _, meta = self.validate(data, base, person_id)
        sha = hashlib.sha256(data).hexdigest()
        version = f"{int(time.time() * 1000):013d}-{sha[:8]}"
        io.write_bytes_atomic(self._person(person_id, "deltas", f"{version}.safetensors"), data)
        record = {"person_id": person_id, "version": version, "base_sha256": base.sha256, "sha256": sha,
                  "bytes": len(data), "dtype": meta.get("dtype"), "scenario": meta.get("scenario"),
                  "created_at": time.time()}
        io.write_bytes_atomic(self._person(person_id, "latest.json"), json.dumps(record, indent=2).encode())
        return record

    def latest(self, person_id: str) -> dict | None:
        url = self._person(person_id, "latest.json")
        if not io.exists(url):
            return None
        return json.loads(io.read_bytes(url))

    def read(self, person_id: str, version: str) -> bytes:
        if not re.fullmatch(r"[0-9]{13}-[0-9a-f]{8}", version):
            raise DeltaRejected(f"invalid delta version {version!r}")
        return io.read_bytes(self._person(person_id, "deltas", f"{version}.safetensors"))

    def load_latest(self, person_id: str, base: BaseModelInfo):
        """(delta, meta, record) of the person's latest valid delta, or None when there is none.

        Raises DeltaRejected when the stored delta is corrupt, tampered or for another base.
        """
        record = self.latest(person_id)
        if record is None:
            return None
        data = self.read(person_id, record["version"])
        if hashlib.sha256(data).hexdigest() != record.get("sha256"):
            raise DeltaRejected(f"stored delta {record['version']} does not match its recorded sha256")
        delta, meta = self.validate(data, base, person_id)
        return delta, meta, record

    def persons(self) -> list[str]:
        fs, path = io.filesystem(io.join(self.url, "persons"))
        if not fs.exists(path):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
