"""Whatever bytes arrive, reading a delta either gives a checked delta or raises `DeltaRejected` with a reason:
no other exception can leave the parser and stop whoever called it (a Flower round, a Serve replica)."""
from __future__ import annotations

import json
import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from model.delta import DeltaRejected, decode_and_validate, encode_delta, read_metadata

BASE = {"encoder.w": torch.linspace(-1, 1, 24).reshape(4, 6), "encoder.b": torch.ones(4),
        "self_head.w": torch.full((3, 4), 0.5)}
SHA = "a" * 64


def valid(dtype: str = "int8") -> bytes:
    delta = {k: 1e-3 * torch.ones_like(v) for k, v in BASE.items()}
    return encode_delta(delta, dtype, SHA, "alice", "offline", 4, 8)


def outcome(data: bytes, trust_region: float = math.inf) -> str:
    try:
        decode_and_validate(data, BASE, set(BASE), SHA, max_bytes=1 << 20, norm_bound=1.0, max_abs=trust_region)
    except DeltaRejected as exc:
        assert str(exc), "a refusal must say why"
        return "refused"
    return "accepted"


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                    max_leaves=12)
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_the_valid_deltas_pass():
    assert {outcome(valid(d)) for d in ("fp32", "fp16", "int8")} == {"accepted"}


@FAST
@given(st.binary(max_size=512))
def test_arbitrary_bytes(data):
    outcome(data)


@FAST
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8),
       st.sampled_from(["fp32", "fp16", "int8"]))
def test_a_valid_delta_with_bytes_changed(edits, dtype):
    data = bytearray(valid(dtype))
    for at, value in edits:
        data[at % len(data)] = value
    outcome(bytes(data))


@FAST
@given(JSON)
def test_any_json_header(header):
    text = json.dumps(header).encode()
    outcome(len(text).to_bytes(8, "little") + text + b"\0" * 64)


@FAST
@given(st.sampled_from(["format", "format_version", "dtype", "base_sha256", "scales", "person_id", "extra"]), JSON)
def test_any_json_in_a_metadata_field(key, value):
    meta = dict(read_metadata(valid()), **{key: json.dumps(value)})
    tensors = {k: torch.ones_like(v, dtype=torch.int8) for k, v in BASE.items()}
    outcome(st_save(tensors, metadata=meta), trust_region=0.01)
