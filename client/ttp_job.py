"""One person's personalization job: frames -> crops -> TTP -> quantized delta bytes.

The single place where a client turns its own frames into a delta; both the
Flower ClientApp (`client/app.py`) and the standalone `posettp personalize`
(`client/edge.py`) call `run_ttp`, so a delta filed by the federation and one
made alone on the edge are the same bytes for the same seed.
"""
from __future__ import annotations

import logging
import resource
import time

from core.checkpoints import model_with_loss
from core.crops import prepare_frames
from model.augment import Augmentation
from model.checkpoint import Checkpoint
from model.config import TTPConfig
from model.delta import deltable_keys, encode_delta, extract_delta
from model.device import pick_device
from model.personalize import TTPResult, personalize

log = logging.getLogger(__name__)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def kept_base_reason(metrics: dict) -> str:
    """Why a run left the base weights unchanged (each safeguard with its measured reason); "" when it made a
    delta."""
    if metrics["delta_tensors"]:
        return ""
    return ("; ".join(f"{e['safeguard']} after {e['after_updates']} updates: {e['reason']}" for e in metrics["safeguards"])
            or f"{metrics['steps']} updates left the encoder and self head unchanged")


def run_ttp(checkpoint: Checkpoint, frames: list, scenario: str, cfg_ttp: TTPConfig, seed: int,
            person_id: str, dtype: str, device: str | None = None, on_progress=None) -> tuple[bytes, dict, TTPResult]:
    """Personalize the checkpoint's model on one person's frames.

    Returns (delta bytes, metrics, TTPResult). The delta is `model.delta`'s safetensors
    encoding (encoder.* / self_head.* changes only, base sha256 of `checkpoint.sha256`); it holds no tensors
    when nothing changed (e.g. the guard rolled back to the base), which `metrics["delta_tensors"] == 0` says.
    The checkpoint's model is not modified. `on_progress(done, total, loss)`: see `model.personalize`; metrics
    carry `safeguards`, each safeguard event with its measured reason.
    """
    if not frames:
        raise ValueError(f"person {person_id!r}: no frames to personalize on")
    t0 = time.perf_counter()
    dev = pick_device(device)
    base_state = {k: v.detach().cpu().clone() for k, v in checkpoint.model.state_dict().items()}
    model, recon = model_with_loss(checkpoint, dev)
    crops, matrices, groups = prepare_frames(frames, checkpoint.config.model.image_size)
    result = personalize(model, recon, crops.to(dev), matrices, groups, cfg_ttp, scenario, seed,
                         augment=Augmentation.from_data(checkpoint.config.data), on_progress=on_progress)
    checkpoint.model.to("cpu")  # the caller's checkpoint back where it was; both are no-ops on the CPU
    result.state = {k: v.cpu() for k, v in result.state.items()}
    keys = deltable_keys(base_state, {n for n, _ in checkpoint.model.named_parameters()})
    delta = extract_delta(base_state, result.state, keys)
    m = result.metrics
    data = encode_delta(delta, dtype, checkpoint.sha256, person_id, scenario, m["steps"], m["frames"],
                        extra={"loss_before": m["loss_before"], "loss_after": m["loss_after"],
                               "guard_events": m["guard_events"], "seed": int(seed)},
                        rank=cfg_ttp.delta_rank, max_abs=cfg_ttp.drift_radius)
    metrics = {
        "scenario": scenario, "frames": int(m["frames"]), "steps": int(m["steps"]),
        "loss_before": float(m["loss_before"]), "loss_after": float(m["loss_after"]),
        "guard_events": int(m["guard_events"]), "safeguards": m["safeguards"], "ttp_seconds": float(m["seconds"]),
        "seconds": time.perf_counter() - t0, "delta_bytes": len(data), "delta_tensors": len(delta),
        "delta_dtype": dtype, "device": dev.type, "peak_rss_mb": peak_rss_mb(),
    }
    log.info("person %s: %d frames, %d steps, loss %.4f -> %.4f, %d guard events, delta %d bytes (%d tensors)",
             person_id, metrics["frames"], metrics["steps"], metrics["loss_before"], metrics["loss_after"],
             metrics["guard_events"], len(data), len(delta))
    return data, metrics, result
