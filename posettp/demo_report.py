"""The demo's measurements over HTTP and its report (markdown + PNGs)."""
from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch

from core.checkpoints import model_with_loss, with_weights
from core.crops import prepare_frame
from core.frames import labeled_person_frames
from core.scoring import evaluate_person, per_frame_pck, score
from data.shards import read_joint_set
from model import io
from model.checkpoint import load_checkpoint
from model.delta import apply_delta
from model.heatmaps import DECODERS, heatmap_to_image
from store.deltas import DeltaStore
from store.policy import DeltaPolicy

BASE_PROBE = "demo-base-probe"  # a person with no delta: the server answers with the base model


def _png(image_rgb: np.ndarray) -> bytes:
    """Lossless, so the server sees exactly the pixels `posettp evaluate` decodes from the shards."""
    return cv2.imencode(".png", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


def _post(url: str, person: str, png: bytes, bbox) -> dict:
    q = ",".join(repr(float(v)) for v in bbox)
    req = urllib.request.Request(f"{url}/v1/persons/{person}/pose?bbox={q}", data=png,
                                 headers={"Content-Type": "image/png"}, method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def query_persons(url: str, data: str) -> dict:
    """Every labeled test frame, posted as the person (personalized) and as a person with no delta (base)."""
    out, joints = {}, read_joint_set(data)
    for pid, frames in labeled_person_frames(data, "test").items():
        preds = {}
        for who in (pid, BASE_PROBE):
            with ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(lambda f, who=who: _post(url, who, _png(f.image), f.bbox), frames))
            preds[who] = answers
        personal = np.array([[[k["x"], k["y"], k["score"]] for k in a["keypoints"]] for a in preds[pid]])
        base = np.array([[[k["x"], k["y"], k["score"]] for k in a["keypoints"]] for a in preds[BASE_PROBE]])
        out[pid] = {"base": score(base, frames, joints), "personalized": score(personal, frames, joints),
                    "model_version": preds[pid][0]["model_version"],
                    "latency_ms_median": float(np.median([a["latency_ms"] for a in preds[pid]])),
                    "predictions": personal.tolist()}
    return out


def _pyplot():
    """matplotlib's pyplot on the file-only backend (lazy: only the report draws, and the backend must be set first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path, dpi: int) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def _plot_bars(path: Path, rows: list[dict], metric: str) -> None:
    plt = _pyplot()
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.8), 3.5))
    for i, (key, label) in enumerate((("base", "base (HTTP)"), ("online", "online TTP"),
                                      ("offline", "offline TTP (HTTP, Flower delta)"))):
        ax.bar(x + (i - 1) * 0.27, [r[key] * 100 for r in rows], 0.27, label=label)
    ax.set_xticks(x, [r["person_id"].split("-")[-1] for r in rows])
    ax.set_xlabel("test person")
    ax.set_ylabel(f"{metric} (%)")
    ax.legend(fontsize=8)
    _save(plt, fig, path, 120)


def _plot_online_curve(path: Path, gains: list[list[float]]) -> None:
    plt = _pyplot()
    length = min(len(g) for g in gains)
    mean = np.nanmean([g[:length] for g in gains], axis=0) * 100
    k = max(3, length // 8)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(mean, alpha=0.35, label="per frame")
    ax.plot(np.arange(length - k + 1) + k // 2, np.convolve(mean, np.ones(k) / k, "valid"), label=f"mean of {k}")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("frame index")
    ax.set_ylabel("online gain (PCK points)")
    ax.legend(fontsize=8)
    _save(plt, fig, path, 120)


def figure5(path: Path, model, frame, image_size: int) -> None:
    """Figure-5-style panels: 30 self-supervised keypoints, 13 joints, affinity arrows (W > 0.1), reconstruction."""
    plt = _pyplot()

    crop, _ = prepare_frame(frame, image_size)
    with torch.no_grad():
        out = model(crop[None], crop[None])
    hm = out["h_sup"].shape[-1]
    kp = heatmap_to_image(out["kp_coords"][0], image_size, hm).numpy()
    joints = heatmap_to_image(DECODERS[model.cfg.decode](out["h_sup"])[0][0], image_size, hm).numpy()
    w = out["affinity"][0].numpy()
    img = crop.permute(1, 2, 0).numpy()
    recon = out["recon"][0].permute(1, 2, 0).clamp(0, 1).numpy()
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.3))
    for ax in axes:
        ax.set_axis_off()
    axes[0].imshow(img)
    axes[0].scatter(kp[:, 0], kp[:, 1], s=12, c=np.arange(len(kp)), cmap="tab20")
    axes[0].set_title("30 self-supervised keypoints")
    axes[1].imshow(img)
    axes[1].scatter(joints[:, 0], joints[:, 1], s=14, c="yellow", edgecolors="k")
    axes[1].set_title("13 predicted joints")
    axes[2].imshow(img)
    for j, k in zip(*np.nonzero(w > 0.1)):
        axes[2].annotate("", xy=joints[j], xytext=kp[k], arrowprops={"arrowstyle": "->", "color": "cyan",
                                                                      "alpha": float(min(1.0, w[j, k] + 0.2))})
    axes[2].set_title("affinity W > 0.1 (keypoint → joint)")
    axes[3].imshow(recon)
    axes[3].set_title("reconstruction")
    _save(plt, fig, path, 110)


def write_report(out: Path, checkpoint: str, data: str, served: dict, fl: dict, timings: dict) -> str:
    """Report with the HTTP numbers beside `posettp evaluate`'s for the same checkpoint and deltas."""
    ck = load_checkpoint(checkpoint)
    model, recon = model_with_loss(ck)
    store = DeltaStore(str(out / "store"), DeltaPolicy.for_checkpoint(ck))
    rows, gains, key = [], [], ck.joint_set.headline
    for pid, frames in labeled_person_frames(data, "test").items():
        found = store.load_latest(pid)
        personal = with_weights(model, apply_delta(model.state_dict(), found[0])) if found else model
        local = evaluate_person(personal, recon, ck.config, frames, "none")
        base = evaluate_person(model, recon, ck.config, frames, "none")
        online = evaluate_person(model, recon, ck.config, frames, "online")
        gains.append((per_frame_pck(online["predictions"], frames, ck.joint_set)
                      - per_frame_pck(base["predictions"], frames, ck.joint_set)).tolist())
        s = served[pid]
        rows.append({"person_id": pid, "base": s["base"][key], "offline": s["personalized"][key],
                     "online": online[key], "evaluate_base": base[key],
                     "evaluate_offline": local[key], "model_version": s["model_version"],
                     "latency_ms": s["latency_ms_median"]})
    _plot_bars(out / "pck_per_person.png", rows, key.upper())
    _plot_online_curve(out / "online_curve.png", gains)
    first = labeled_person_frames(data, "test")
    pid0 = next(iter(first))
    figure5(out / "figure5.png", model, first[pid0][len(first[pid0]) // 2], ck.config.model.image_size)
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("base", "offline", "online", "evaluate_base",
                                                             "evaluate_offline")}
    mismatch = max(max(abs(r["base"] - r["evaluate_base"]), abs(r["offline"] - r["evaluate_offline"])) for r in rows)
    flip = "with the flip test, the best inference without personalization" if ck.config.model.flip_test else \
        "without the flip test"
    gain = np.array([r["offline"] - r["base"] for r in rows]) * 100
    lines = ["# posettp demo report", "",
             f"checkpoint `{checkpoint}` (sha256 {ck.sha256[:12]}), data `{data}`, {len(rows)} unseen test persons.",
             "", f"{key.upper()} (%) measured **through the HTTP endpoint** (base = a person with no delta, {flip}; "
             "personalized = the person's offline delta filed by the Flower run, the same inference), beside "
             "`posettp evaluate` on the same checkpoint and deltas, and online TTP (local).", "",
             "| person | base (HTTP) | personalized (HTTP) | gain (HTTP) | evaluate base | evaluate personalized | "
             "online TTP | model_version | p50 latency ms |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r, g in zip(rows, gain):
        lines.append(f"| {r['person_id']} | {r['base'] * 100:.1f} | {r['offline'] * 100:.1f} | {g:+.1f} | "
                     f"{r['evaluate_base'] * 100:.1f} | {r['evaluate_offline'] * 100:.1f} | {r['online'] * 100:.1f} | "
                     f"{r['model_version']} | {r['latency_ms']:.1f} |")
    se = gain.std(ddof=1) / np.sqrt(len(gain)) if len(gain) > 1 else 0.0
    lines.append(f"| **mean** | {mean['base'] * 100:.1f} | {mean['offline'] * 100:.1f} | **{gain.mean():+.1f} ± "
                 f"{se:.1f}** | {mean['evaluate_base'] * 100:.1f} | {mean['evaluate_offline'] * 100:.1f} | "
                 f"{mean['online'] * 100:.1f} | | |")
    lines += ["", f"Gain: mean ± standard error over the {len(rows)} persons; {int((gain > 0).sum())} gain, "
              f"{int((gain < -1).sum())} lose more than a point (worst {gain.min():+.1f}). Largest HTTP-vs-evaluate "
              f"difference: {mismatch * 100:.2f} PCK points.", "",
              "![per-person PCK](pck_per_person.png)", "", "![online gain](online_curve.png)", "",
              "![figure 5](figure5.png)", "", "## Flower runs", ""]
    for scenario, summary in fl.items():
        lines.append(f"- {scenario}: {summary.get('stored')} deltas stored, mean "
                     f"{summary.get('mean_delta_bytes', 0):,.0f} bytes per client vs a "
                     f"{summary.get('checkpoint_bytes', 0):,} byte checkpoint, {summary.get('wall_seconds', 0):.0f} s")
    lines += ["", "## Where the time went", ""] + [f"- {k}: {v:.0f} s" for k, v in timings.items()]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(io.json_text({"persons": rows, "mean": mean, "timings": timings,
                                                   "gain_mean": float(gain.mean()) / 100, "gain_se": float(se) / 100,
                                                   "http_vs_evaluate_max_diff": mismatch}))
    print("\n".join(lines[6:8 + len(rows) + 3]))
    return str(report)
