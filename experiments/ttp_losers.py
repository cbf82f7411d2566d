"""Can the persons TTP hurts be told apart without labels?

`experiments.ttp_direction` found that a person's loss is the update's direction, repeated by every TTP seed: a
property of the person. The safeguards (`model/personalize.py`) judge the reconstruction loss, its pose signal and the
supervised heatmaps' peaks on probe frames, and they let those persons through. This measures, for every person the
offline TTP of `posettp reproduce` adapted, other label-free signals on the person's own frames, for the base and
for the adapted model, and how well the change in each predicts the gain:

- flip gap: the prediction on the mirrored crop, mirrored back with left and right swapped, against the prediction
  (pixels; a model that is right is consistent with itself);
- augmentation gap: the same under a zoom in and out, a rotation either way and a shift of the crop;
- jitter: the joints' frame-to-frame acceleration along each video (pixels; poses move smoothly);
- confidence: the supervised heatmaps' decoded peak;
- fresh-pair loss and pose signal: the reconstruction loss on pairs TTP did not draw, and how much swapping their
  keypoints raises it;
- move: how far the adapted model's predictions are from the base's.

For each: the Spearman correlation of its change with the gain, how well it ranks the persons that lose (AUC), and
what a threshold-free rule would give (keep the base wherever the signal got worse).

Run: .venv/bin/python -m experiments.ttp_losers --run OUT_OF_REPRODUCE [--seeds 0,1,2 --persons 30 --jobs 2
     --set data.url=... --set data.test_split=val --out F]
"""
from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from core.crops import prepare_frames
from core.scoring import score
from experiments.ttp_direction import rows_of_every_seed, run_arguments, transformer_setup
from model.augment import Augmentation
from model.config import apply_overrides, from_dict
from model.delta import apply_delta, extract_delta
from model.joints import joint_set
from model.objectives import pose_signal
from model.personalize import personalize, probe_pairs
from model.predict import predict_crops

FRESH_PAIR_SEED = 424242  # the fresh pairs' generator: no TTP seed draws them
# crop-to-crop views for the augmentation gap: (zoom, rotation degrees, shift in crop px)
VIEWS = ((1.15, 0.0, 0.0), (0.87, 0.0, 0.0), (1.0, 15.0, 0.0), (1.0, -15.0, 0.0), (1.0, 0.0, 4.0))
# the direction in which each signal gets worse (+1: larger is worse)
WORSE = {"flip_gap": 1, "aug_gap": 1, "jitter": 1, "confidence": -1, "fresh_loss": 1, "pose_signal": -1}


def _view(size: int, zoom: float, rot: float, shift: float) -> np.ndarray:
    """Crop-to-crop affine: zoom and rotate about the crop's centre, then move right and down by `shift` px."""
    m = cv2.getRotationMatrix2D(((size - 1) / 2, (size - 1) / 2), rot, zoom)
    m[:, 2] += shift
    return m


def _then(a: np.ndarray, m: np.ndarray) -> np.ndarray:
    """The 2x3 affine of m followed by a."""
    out = a[:, :2] @ m
    out[:, 2] += a[:, 2]
    return out


def predicted_views(model, crops: torch.Tensor, matrices: np.ndarray) -> dict[str, np.ndarray]:
    """Predictions (image px) on the crops as they are, mirrored (joints swapped back) and under each view."""
    size = crops.shape[-1]
    out = {"plain": predict_crops(model, crops, matrices)}
    mirror = np.array([[-1.0, 0.0, size - 1.0], [0.0, 1.0, 0.0]])
    flipped = predict_crops(model, crops.flip(-1), np.stack([_then(mirror, m) for m in matrices]))
    out["flip"] = flipped[:, joint_set(model.cfg.joint_set).flip_permutation()]
    images = crops.permute(0, 2, 3, 1).numpy()
    for i, view in enumerate(VIEWS):
        a = _view(size, *view)
        warped = np.stack([cv2.warpAffine(im, a, (size, size), flags=cv2.INTER_LINEAR) for im in images])
        out[f"view{i}"] = predict_crops(model, torch.from_numpy(warped).permute(0, 3, 1, 2).contiguous(),
                                        np.stack([_then(a, m) for m in matrices]))
    return out


def _gap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a[..., :2] - b[..., :2], axis=-1).mean())


def jitter(pred: np.ndarray, frames: list) -> float:
    """Mean |p[t+1] - 2 p[t] + p[t-1]| over runs of three consecutive frames of one video."""
    order = sorted(range(len(frames)), key=lambda i: (frames[i].video_id, frames[i].frame))
    acc = [np.linalg.norm(pred[c, :, :2] - 2 * pred[b, :, :2] + pred[a, :, :2], axis=-1).mean()
           for a, b, c in zip(order, order[1:], order[2:])
           if frames[a].video_id == frames[c].video_id and frames[c].frame - frames[a].frame == 2]
    return float(np.mean(acc)) if acc else float("nan")


def signals(model, recon, crops, matrices, frames, pairs) -> tuple[dict[str, float], np.ndarray]:
    views = predicted_views(model, crops, matrices)
    plain = views["plain"]
    fresh_loss, signal = pose_signal(model, recon, *pairs)
    return {"flip_gap": _gap(plain, views["flip"]),
            "aug_gap": float(np.mean([_gap(plain, views[f"view{i}"]) for i in range(len(VIEWS))])),
            "jitter": jitter(plain, frames), "confidence": float(plain[..., 2].mean()),
            "fresh_loss": fresh_loss, "pose_signal": signal}, plain


def person_rows(run: Path, run_cfg, seed: int, persons: int) -> list[dict]:
    exp, model, recon, cfg, base, keys = transformer_setup(run, run_cfg, seed)
    scorer = type(model)(model.cfg).eval()
    rows = []
    for pid, frames in tqdm(list(exp.test_persons().items())[:persons], desc=f"transformer s{seed}", mininterval=10):
        crops, matrices, groups = prepare_frames(frames, cfg.model.image_size)
        result = personalize(model, recon, crops, matrices, groups, cfg.ttp, "offline", seed,
                             augment=Augmentation.from_data(cfg.data))
        delta = extract_delta(base, result.state, keys)
        pairs = probe_pairs(crops, groups, len(crops), cfg.ttp.batch_size, FRESH_PAIR_SEED, cfg.ttp.cross_video)
        before, base_pred = signals(model, recon, crops, matrices, frames, pairs)
        row = {"person_id": pid, "seed": seed, "adapted": bool(delta), "guard_events": result.metrics["guard_events"],
               "none": score(base_pred, frames, joint_set(cfg.model.joint_set))["pck@0.2"], "base": before}
        if delta:
            scorer.load_state_dict(apply_delta(base, delta))
            after, pred = signals(scorer, recon, crops, matrices, frames, pairs)
            row.update(ttp=score(pred, frames, joint_set(cfg.model.joint_set))["pck@0.2"], adapted_signals=after,
                       move=_gap(pred, base_pred))
        rows.append(row)
    return rows


def _auc(score_: np.ndarray, positive: np.ndarray) -> float:
    """P(a positive scores higher than a negative), ties half."""
    pos, neg = score_[positive], score_[~positive]
    if not len(pos) or not len(neg):
        return float("nan")
    return float(((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()))


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1])


def summary(rows: list[dict]) -> dict:
    """Over the adapted persons: each signal's change (worse = positive), against the gain in PCK points."""
    adapted = [r for r in rows if r["adapted"]]
    gain = np.array([r["ttp"] - r["none"] for r in adapted]) * 100
    everyone = np.array([r.get("ttp", r["none"]) - r["none"] for r in rows]) * 100

    def outcome(rolled_back: np.ndarray) -> dict:
        kept = everyone.copy()
        kept[[i for i, r in enumerate(rows) if r["adapted"]]] = np.where(rolled_back, 0.0, gain)
        return {"mean": float(kept.mean()), "se": float(kept.std(ddof=1) / np.sqrt(len(kept))),
                "lose_gt_1": int((kept < -1).sum()), "rolled_back": int(rolled_back.sum())}

    changes = {name: np.array([sign * (r["adapted_signals"][name] - r["base"][name]) for r in adapted])
               for name, sign in WORSE.items()}
    changes["move"] = np.array([r["move"] for r in adapted])
    out = {"persons": len(rows), "adapted": len(adapted), "losers_gt_1": int((gain < -1).sum()),
           "losers": int((gain < 0).sum()), "ttp": outcome(np.zeros(len(adapted), bool)), "signals": {}}
    for name, change in changes.items():
        s = {"spearman_with_gain": _spearman(change, gain), "auc_loses": _auc(change, gain < 0),
             "auc_loses_gt_1": _auc(change, gain < -1), "worse_for": int((change > 0).sum())}
        if name in WORSE:
            s["rule"] = outcome(change > 0)
        out["signals"][name] = s
    return out


def main() -> None:
    ap = run_arguments(__doc__.splitlines()[0])
    ap.add_argument("--set", action="append", default=[], help="config override, e.g. data.test_split=val")
    args = ap.parse_args()
    run = Path(args.run)
    run_cfg = apply_overrides(from_dict(json.loads((run / "config.json").read_text())), args.set)
    t0 = time.perf_counter()
    rows = rows_of_every_seed(partial(person_rows, run, run_cfg, persons=args.persons), args.seeds, args.jobs)
    result = {"summary": summary(rows), "rows": rows, "config": run_cfg.to_dict(), "overrides": args.set,
              "seconds": time.perf_counter() - t0}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    s = result["summary"]
    t = s["ttp"]
    print(f"{s['persons']} person x model pairs, {s['adapted']} adapted ({s['losers']} lose, {s['losers_gt_1']} "
          f"by more than a point); offline TTP {t['mean']:+.2f} ± {t['se']:.2f}, {t['lose_gt_1']} lose > 1")
    print("| signal | Spearman with gain | AUC loses | AUC loses > 1 | worse for | rule: base where worse |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, x in s["signals"].items():
        rule = x.get("rule")
        rule_text = (f"{rule['mean']:+.2f} ± {rule['se']:.2f}, {rule['lose_gt_1']} lose > 1, "
                     f"{rule['rolled_back']} rolled back") if rule else "–"
        print(f"| {name} | {x['spearman_with_gain']:+.2f} | {x['auc_loses']:.2f} | {x['auc_loses_gt_1']:.2f} | "
              f"{x['worse_for']} | {rule_text} |")
    print(f"{result['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
