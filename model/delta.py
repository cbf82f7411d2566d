"""Personalization deltas: extract, quantize, encode, validate, apply.

A delta holds (personalized - base) for the `encoder.*` and `self_head.*`
parameters that changed, as safetensors with JSON metadata. Deltas come from
untrusted clients, so `decode_and_validate` checks everything before any tensor
is used, and nothing is ever unpickled.

A low-rank delta (`ttp.delta_rank`) stores a weight's change as two factors,
`{name}.factor_b` (out, r) @ `{name}.factor_a` (r, in * kh * kw); every reader
rebuilds the dense change and holds it to the same rules as a dense one.
"""
from __future__ import annotations

import json
import math
import time

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

FORMAT = "posettp-delta"
FORMAT_VERSION = "1"
DELTA_PREFIXES = ("encoder.", "self_head.")
DTYPES = ("fp32", "fp16", "int8")
# ||delta|| / ||base weights it touches||: honest TTP without a trust region reached at most 0.071 at lr 1e-4 (10x the
# shipped ttp.lr) and 0.157 at lr 3e-4 with the guard off (synth_small, 298 online steps); 0.25 refuses -w, -0.5w and
# +w (1.0, 0.5, 1.0)
DEFAULT_NORM_BOUND = 0.25
# The same ratio per tensor, so that a delta cannot erase one tensor while the others keep the sum small: honest
# maxima 0.148 (lr 1e-4) and 0.317 (lr 3e-4, guard off), always encoder.deconv.0.weight, about 2.3x the global ratio.
# A tensor's norm counts as at least that of weights of RMS TENSOR_NORM_FLOOR (zero-initialised biases)
DEFAULT_TENSOR_NORM_BOUND = 0.4
TENSOR_NORM_FLOOR = 1e-2
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
FACTOR_A, FACTOR_B = ".factor_a", ".factor_b"
# Rounding an honest trust-region delta may add: fp16 storage (2^-11 relative, 2^-25 absolute among fp16's subnormals;
# with room) and base + radius in fp32 (half an ulp of the base weight)
BOUND_REL_SLACK, BOUND_ABS_SLACK, BOUND_BASE_SLACK = 2.0 ** -10, 2.0 ** -24, 2.0 ** -22


class DeltaRejected(ValueError):
    """A delta that must not be applied; the message is the reason the client sees."""


def deltable_keys(model_state: dict[str, torch.Tensor], param_names: set[str]) -> list[str]:
    """Parameter names a delta may carry (float parameters of encoder and self_head)."""
    return [k for k in model_state if k.startswith(DELTA_PREFIXES) and k in param_names]


def extract_delta(base: dict[str, torch.Tensor], personal: dict[str, torch.Tensor], keys: list[str]) -> dict[str, torch.Tensor]:
    """fp32 (personalized - base) for the given keys that changed."""
    out = {}
    for k in keys:
        d = personal[k].detach().float().cpu() - base[k].detach().float().cpu()
        if torch.count_nonzero(d):
            out[k] = d.contiguous()
    return out


def quantize(delta: dict[str, torch.Tensor], dtype: str) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Per-tensor symmetric quantization; returns (stored tensors, scales)."""
    if dtype not in DTYPES:
        raise ValueError(f"delta dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype == "fp32":
        return {k: v.float() for k, v in delta.items()}, {}
    if dtype == "fp16":
        return {k: v.half() for k, v in delta.items()}, {}
    stored, scales = {}, {}
    for k, v in delta.items():
        scale = float(v.abs().max()) / 127.0 or 1.0
        stored[k] = torch.clamp(torch.round(v / scale), -127, 127).to(torch.int8)
        scales[k] = scale
    return stored, scales


def dequantize(stored: dict[str, torch.Tensor], scales: dict[str, float]) -> dict[str, torch.Tensor]:
    return {k: v.float() * scales[k] if v.dtype == torch.int8 else v.float() for k, v in stored.items()}


def _as_matrix(shape) -> tuple[int, int]:
    return shape[0], math.prod(shape[1:])


def factorize(delta: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Each change of 2+ dims as its best rank-`rank` factors (exact for a change of that rank, which low-rank TTP
    makes), where the factors are smaller than it; the rest unchanged. The singular values are split evenly between
    the factors, so that both quantize alike."""
    out = {}
    for k, v in delta.items():
        rows, cols = _as_matrix(v.shape)
        if v.ndim < 2 or rank * (rows + cols) >= rows * cols:
            out[k] = v
            continue
        u, s, vh = torch.linalg.svd(v.double().reshape(rows, cols), full_matrices=False)
        root = s[:rank].sqrt()
        out[k + FACTOR_B] = (u[:, :rank] * root).float().contiguous()
        out[k + FACTOR_A] = (root[:, None] * vh[:rank]).float().contiguous()
    return out


def rebuild(delta: dict[str, torch.Tensor], base_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dense changes from a delta whose weights may be stored as factors; DeltaRejected on anything but a pair of
    factors whose product has the weight's shape (and is not also stored dense)."""
    out = {k: v for k, v in delta.items() if not k.endswith((FACTOR_A, FACTOR_B))}
    for k in delta:
        if not k.endswith(FACTOR_B):
            if k.endswith(FACTOR_A) and k[:-len(FACTOR_A)] + FACTOR_B not in delta:
                raise DeltaRejected(f"tensor {k!r} has no {FACTOR_B} partner")
            continue
        name = k[:-len(FACTOR_B)]
        a, b = delta.get(name + FACTOR_A), delta[k]
        if a is None:
            raise DeltaRejected(f"tensor {k!r} has no {FACTOR_A} partner")
        if name in out:
            raise DeltaRejected(f"tensor {name!r} is stored both dense and as factors")
        rows, cols = _as_matrix(base_state[name].shape)
        if a.ndim != 2 or b.ndim != 2 or b.shape[0] != rows or a.shape[1] != cols or a.shape[0] != b.shape[1] \
                or not 1 <= a.shape[0] < min(rows, cols):
            raise DeltaRejected(f"factors of {name!r} have shapes {tuple(b.shape)} @ {tuple(a.shape)}, not "
                                f"({rows}, r) @ (r, {cols}) with 1 <= r < {min(rows, cols)}")
        out[name] = (b.double() @ a.double()).float().reshape(base_state[name].shape)
    return out


def encode_delta(delta: dict[str, torch.Tensor], dtype: str, base_sha256: str, person_id: str,
                 scenario: str, steps: int, frames: int, extra: dict | None = None, rank: int = 0,
                 max_abs: float = math.inf) -> bytes:
    """The delta's bytes; `rank` > 0 stores weights as rank-`rank` factors (`factorize`), each weight's factors
    shrunk where their quantized product would move it beyond `max_abs` (the trust region the readers hold it to);
    the other weights stay as they are."""
    tensors = factorize(delta, rank) if rank else delta
    stored, scales = quantize(tensors, dtype)
    for _ in range(8 if rank and max_abs < math.inf else 0):
        dense = rebuild(dequantize(stored, scales), delta)  # the change as a reader will see it
        largest = {k: float(v.abs().max()) for k, v in dense.items()}
        over = {k + FACTOR_B: max_abs / m * (1 - 2.0 ** -12) for k, m in largest.items() if m > max_abs}
        if not over:
            break
        tensors = {k: v * over.get(k, 1.0) for k, v in tensors.items()}
        stored, scales = quantize(tensors, dtype)
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "dtype": dtype, "base_sha256": base_sha256,
        "person_id": person_id, "scenario": scenario, "steps": str(int(steps)), "frames": str(int(frames)),
        "created_at": f"{time.time():.3f}", "scales": json.dumps(scales), "extra": json.dumps(extra or {}),
    }
    return st_save(stored, metadata=meta)


def read_metadata(data: bytes) -> dict:
    """Parse just the safetensors header (8-byte length + JSON) without touching tensors."""
    if len(data) < 8:
        raise DeltaRejected("not a safetensors file: too short")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise DeltaRejected("not a safetensors file: bad header length")
    try:
        header = json.loads(data[8:8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DeltaRejected(f"not a safetensors file: header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise DeltaRejected(f"not a safetensors file: header is a JSON {type(header).__name__}, not an object")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise DeltaRejected("not a safetensors file: __metadata__ must map names to strings")
    return meta


def decode_and_validate(data: bytes, base_state: dict[str, torch.Tensor], allowed_keys: set[str],
                        base_sha256: str, max_bytes: int = DEFAULT_MAX_BYTES,
                        norm_bound: float = DEFAULT_NORM_BOUND,
                        max_abs: float = math.inf,
                        tensor_norm_bound: float = DEFAULT_TENSOR_NORM_BOUND) -> tuple[dict[str, torch.Tensor], dict]:
    """Return (fp32 delta, metadata) or raise DeltaRejected with the reason.

    `max_abs`: no weight may move further than this (the trust region honest clients ran with, up to rounding);
    a much tighter check than the norm bound where it applies.
    """
    if len(data) > max_bytes:
        raise DeltaRejected(f"delta is {len(data)} bytes, over the {max_bytes}-byte cap")
    meta = read_metadata(data)
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise DeltaRejected(f"unknown delta format {meta.get('format')!r} v{meta.get('format_version')!r}")
    if meta.get("base_sha256") != base_sha256:
        raise DeltaRejected(f"delta was made for base {str(meta.get('base_sha256'))[:12]}, not {base_sha256[:12]}")
    dtype = meta.get("dtype")
    if dtype not in DTYPES:
        raise DeltaRejected(f"unknown delta dtype {dtype!r}")
    try:
        stored = dict(sorted(st_load(data).items()))  # load order varies: sorted, every reader names one tensor
        scales = json.loads(meta.get("scales", "{}"))
    except (SafetensorError, json.JSONDecodeError, ValueError) as exc:
        raise DeltaRejected(f"unreadable delta: {exc}") from exc
    if not isinstance(scales, dict):
        raise DeltaRejected(f"unreadable delta: scales are a JSON {type(scales).__name__}, not an object")
    if not stored:
        raise DeltaRejected("delta holds no tensors")
    want = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8}[dtype]
    for k, v in stored.items():
        name = k[:-len(FACTOR_A)] if k.endswith((FACTOR_A, FACTOR_B)) else k
        if name not in allowed_keys:
            raise DeltaRejected(f"tensor {k!r} is not an encoder/self_head parameter of this model")
        if name == k and tuple(v.shape) != tuple(base_state[k].shape):
            raise DeltaRejected(f"tensor {k!r} has shape {tuple(v.shape)}, expected {tuple(base_state[k].shape)}")
        if v.dtype != want:
            raise DeltaRejected(f"tensor {k!r} is {v.dtype}, the header says {dtype}")
        if dtype == "int8" and not isinstance(scales.get(k), (int, float)):
            raise DeltaRejected(f"tensor {k!r} has no scale")
    delta = dequantize(stored, scales)
    for k, v in delta.items():  # before any product: a NaN factor must be named as such
        if not torch.isfinite(v).all():
            raise DeltaRejected(f"tensor {k!r} holds NaN or Inf")
    delta = rebuild(delta, base_state)
    delta_sq = base_sq = 0.0
    for k, v in delta.items():
        if not torch.isfinite(v).all():
            raise DeltaRejected(f"tensor {k!r} holds NaN or Inf")
        if max_abs < math.inf:
            slack = max_abs * BOUND_REL_SLACK + BOUND_ABS_SLACK + base_state[k].abs() * BOUND_BASE_SLACK
            excess = v.abs() - (max_abs + slack)
            if bool((excess > 0).any()):
                raise DeltaRejected(f"tensor {k!r} moves a weight by {float(v.abs().max()):.3g}, beyond the "
                                    f"trust region of {max_abs:.3g} the clients run with")
        d_sq, w_sq = float((v.double() ** 2).sum()), float((base_state[k].double() ** 2).sum())
        tensor_rel = d_sq ** 0.5 / max(w_sq ** 0.5, TENSOR_NORM_FLOOR * v.numel() ** 0.5)
        if tensor_rel > tensor_norm_bound:
            raise DeltaRejected(f"tensor {k!r} moves by {tensor_rel:.3g} x its own norm, over the per-tensor bound "
                                f"{tensor_norm_bound:g}")
        delta_sq += d_sq
        base_sq += w_sq
    rel = (delta_sq ** 0.5) / max(base_sq ** 0.5, 1e-12)
    if rel > norm_bound:
        raise DeltaRejected(f"delta norm is {rel:.3g} x the base weights' norm, over the bound {norm_bound:g}")
    meta = dict(meta, relative_norm=rel)
    return delta, meta


def apply_delta(state: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """New state dict: base tensors shared, only the changed tensors copied (cheap per person)."""
    out = dict(state)
    for k, v in delta.items():
        out[k] = (state[k].float() + v.to(state[k].device)).to(state[k].dtype)
    return out
