"""The one delta policy: what a delta must be before anything stores, loads or applies it.

Deltas come from untrusted clients and the store may be tampered with after the fact, so every writer
(the Flower server, `posettp personalize --store`) and every reader (`posettp evaluate --store`, Serve)
holds a delta to the same rules, built from the base checkpoint: its keys, shapes and dtypes, a size cap
(the fp32 size of every tensor a delta may carry, unless set lower), norm bounds (the whole delta's and each
tensor's, relative to the base weights), and the trust region
the checkpoint's own TTP settings run with (no honest delta moves a weight further).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from model.checkpoint import Checkpoint
from model.delta import (DEFAULT_NORM_BOUND, DEFAULT_TENSOR_NORM_BOUND, DeltaRejected, decode_and_validate,
                         deltable_keys)

PERSON_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
HEADER_ROOM = 65536  # safetensors header, metadata and int8 scales on top of the tensors
HEADER_ROOM_PER_TENSOR = 512


def check_person_id(person_id: str) -> str:
    """Person ids become path components: refuse anything else before it touches a path."""
    if not isinstance(person_id, str) or not PERSON_ID.fullmatch(person_id) or person_id in (".", ".."):
        raise DeltaRejected(f"invalid person id {person_id!r}: must match [A-Za-z0-9_.-]{{1,64}}")
    return person_id


@dataclass
class DeltaPolicy:
    """The rules for deltas against one base model; `check` applies them all or raises DeltaRejected."""

    sha256: str
    state: dict[str, torch.Tensor]
    allowed_keys: set[str]
    max_bytes: int
    norm_bound: float
    trust_region: float  # no weight may move further (up to rounding); inf = no trust region
    tensor_norm_bound: float = DEFAULT_TENSOR_NORM_BOUND

    @classmethod
    def for_model(cls, model: torch.nn.Module, sha256: str, *, trust_region: float = math.inf,
                  max_bytes: int = 0, norm_bound: float = DEFAULT_NORM_BOUND) -> "DeltaPolicy":
        """`max_bytes` 0: the largest honest delta, every allowed tensor in fp32 plus header room."""
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}  # deltas are checked on the CPU
        allowed = set(deltable_keys(state, {n for n, _ in model.named_parameters()}))
        if not max_bytes:
            max_bytes = sum(state[k].numel() * 4 for k in allowed) + HEADER_ROOM + HEADER_ROOM_PER_TENSOR * len(allowed)
        return cls(sha256, state, allowed, int(max_bytes), float(norm_bound), float(trust_region))

    @classmethod
    def for_checkpoint(cls, ck: Checkpoint, *, max_bytes: int = 0,
                       norm_bound: float = DEFAULT_NORM_BOUND) -> "DeltaPolicy":
        """The policy every store user builds: the trust region is the checkpoint's own `ttp.drift_radius`."""
        return cls.for_model(ck.model, ck.sha256, trust_region=ck.config.ttp.drift_radius, max_bytes=max_bytes,
                             norm_bound=norm_bound)

    def check(self, data: bytes, person_id: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
        """(fp32 delta, metadata) of a delta that passes every rule; `person_id`: whom it must be for."""
        delta, meta = decode_and_validate(data, self.state, self.allowed_keys, self.sha256, self.max_bytes,
                                          self.norm_bound, self.trust_region, self.tensor_norm_bound)
        if person_id is not None and meta.get("person_id") != person_id:
            raise DeltaRejected(f"delta is for person {meta.get('person_id')!r}, not {person_id!r}")
        return delta, meta
