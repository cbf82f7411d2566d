"""What travels between the Flower ServerApp and ClientApp: one definition both sides import.

Server -> client, message type `train`:
  `base`    ArrayRecord: the full base state dict (one array per tensor, numpy, no pickle)
  `config`  ConfigRecord: `checkpoint-meta` (the checkpoint's config.json as a JSON string:
            resolved config + loss running means), `base-sha256`, `scenario`, `ttp-steps`,
            `delta-dtype`, `seed`, `round`
Client -> server (reply):
  `status`  ConfigRecord: `state` (ok | unchanged | error), `reason`, `person-id`,
            `base-sha256` (recomputed by the client from the weights it received)
  `metrics` MetricRecord: numbers only (frames, steps, loss_before, loss_after, guard_events,
            seconds, ttp_seconds, delta_bytes, delta_tensors, peak_rss_mb, download_bytes)
  `delta`   ArrayRecord with one uint8 array `safetensors`: a delta file as `model.delta` encodes it
            (only when state is ok). Sent as an array so Flower chunks it like weights.
Server -> client, message type `query.verdict`: `verdict` ConfigRecord (person-id, status,
  reason, version); the client logs it and answers `ack`.

Nothing else is ever put in a client message: no pixels, no keypoints, no crops.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from model.checkpoint import Checkpoint, state_bytes
from model.config import from_dict
from model.network import build_model

TRAIN = "train"
VERDICT = "query.verdict"
BLOB_KEY = "safetensors"
STATES = ("ok", "unchanged", "error")
METRIC_KEYS = ("frames", "steps", "loss_before", "loss_after", "guard_events", "seconds", "ttp_seconds",
               "delta_bytes", "delta_tensors", "peak_rss_mb", "download_bytes")


class BaseMismatch(ValueError):
    """The weights received do not hash to what the server announced."""


def base_records(ck: Checkpoint, settings: dict) -> tuple[ArrayRecord, ConfigRecord]:
    arrays = ArrayRecord.from_torch_state_dict(ck.model.state_dict())
    meta = dict(ck.meta)
    meta.setdefault("config", ck.config.to_dict())
    meta.setdefault("loss_buffers", ck.loss_buffers)
    config = ConfigRecord({"checkpoint-meta": json.dumps(meta, default=float), "base-sha256": ck.sha256,
                           **settings})
    return arrays, config


def checkpoint_from_records(arrays: ArrayRecord, config: ConfigRecord) -> Checkpoint:
    """Rebuild the base model from the received arrays + config.json and verify its hash.

    The sha256 is recomputed the way `model.checkpoint` defines a checkpoint's
    identity (safetensors bytes of the model's state dict), from the model the
    client will actually run, and compared with the hash the server announced.
    """
    meta = json.loads(str(config["checkpoint-meta"]))
    cfg = from_dict(meta["config"])
    model = build_model(cfg.model)
    state = arrays.to_torch_state_dict()
    model.load_state_dict(state, strict=True)  # missing/unexpected keys or shapes raise
    sha = hashlib.sha256(state_bytes(model)).hexdigest()
    announced = str(config["base-sha256"])
    if sha != announced:
        raise BaseMismatch(f"received weights hash to {sha[:12]}, the server announced {announced[:12]}")
    model.eval()
    return Checkpoint(model=model, config=cfg, meta=meta, sha256=sha, loss_buffers=meta.get("loss_buffers", {}))


def blob_record(data: bytes) -> ArrayRecord:
    return ArrayRecord({BLOB_KEY: Array(np.frombuffer(data, dtype=np.uint8).copy())})


def blob_from_record(record: ArrayRecord) -> bytes:
    if list(record.keys()) != [BLOB_KEY]:
        raise ValueError(f"delta record must hold exactly one array {BLOB_KEY!r}, got {list(record.keys())[:5]}")
    arr = record[BLOB_KEY]
    if arr.dtype != "uint8" or len(arr.shape) != 1:
        raise ValueError(f"delta array must be 1-D uint8, got {arr.dtype} {arr.shape}")
    return arr.numpy().tobytes()


def metric_record(metrics: dict) -> MetricRecord:
    return MetricRecord({k: (float(metrics[k]) if isinstance(metrics[k], float) else int(metrics[k]))
                         for k in METRIC_KEYS if k in metrics and metrics[k] is not None})

