"""experiments/ttp_losers.py judges label-free signals by how they rank the persons TTP hurts: its views must map
predictions back to the image exactly, its jitter must count only consecutive frames of one video, and its rules
must keep a rolled-back person at the base score."""
from types import SimpleNamespace

import cv2
import numpy as np

from experiments.ttp_losers import VIEWS, _auc, _then, _view, jitter, summary
from model.transforms import apply_affine, crop_matrix


def test_views_compose_with_the_crop_and_move_the_pixels_where_they_say():
    m = crop_matrix((10.0, 20.0, 40.0, 60.0), 64)
    point = np.array([[31.0, 47.0]])
    for view in VIEWS:
        a = _view(64, *view)
        composed = apply_affine(point, _then(a, m))
        assert np.allclose(composed, apply_affine(apply_affine(point, m), a))
        blob = np.zeros((64, 64), np.float32)
        blob[30:33, 25:28] = 1.0  # centred on crop pixel (26, 31)
        moved = cv2.warpAffine(blob, a, (64, 64), flags=cv2.INTER_LINEAR)
        ys, xs = np.nonzero(moved)
        centre = np.array([(xs * moved[ys, xs]).sum(), (ys * moved[ys, xs]).sum()]) / moved[ys, xs].sum()
        assert np.allclose(centre, apply_affine(np.array([[26.0, 31.0]]), a)[0], atol=0.1)


def test_jitter_counts_consecutive_frames_of_one_video_only():
    frames = [SimpleNamespace(video_id=v, frame=f) for v, f in
              [("a", 0), ("a", 1), ("a", 2), ("a", 3), ("b", 0), ("b", 1), ("a", 9)]]
    pred = np.zeros((len(frames), 2, 3))
    pred[:4, :, 0] = np.array([0.0, 1.0, 2.0, 3.0])[:, None]  # video a: uniform motion, no acceleration
    pred[4:6, :, 0] = 50.0  # video b has no run of three frames
    pred[6, :, 0] = 80.0  # a's frame 9 follows frame 3 with a gap
    assert jitter(pred, frames) == 0.0
    pred[2, :, 1] = 2.0  # a kink at a's frame 2: the runs centred on frames 1 and 2 accelerate by 2 and 4
    assert np.isclose(jitter(pred, frames), (2.0 + 4.0) / 2)


def test_auc_ranks_positives_and_counts_ties_half():
    assert _auc(np.array([3.0, 2.0, 1.0, 0.0]), np.array([True, True, False, False])) == 1.0
    assert _auc(np.array([1.0, 1.0]), np.array([True, False])) == 0.5
    assert np.isnan(_auc(np.array([1.0]), np.array([True])))


def test_summary_rolls_back_persons_whose_signal_got_worse_to_their_base_score():
    def signals(flip_gap: float) -> dict:
        return {"flip_gap": flip_gap, "aug_gap": 1.0, "jitter": 1.0, "confidence": 0.8, "fresh_loss": 1.0,
                "pose_signal": 1.5}

    rows = [{"adapted": True, "none": 0.50, "ttp": 0.55, "base": signals(3.0), "adapted_signals": signals(2.0),
             "move": 1.0},
            {"adapted": True, "none": 0.60, "ttp": 0.57, "base": signals(3.0), "adapted_signals": signals(3.5),
             "move": 2.0},
            {"adapted": False, "none": 0.70, "base": signals(3.0)}]
    s = summary(rows)
    assert s["adapted"] == 2 and s["losers_gt_1"] == 1
    assert np.isclose(s["ttp"]["mean"], (5.0 - 3.0) / 3)
    flip = s["signals"]["flip_gap"]
    assert flip["auc_loses"] == 1.0 and flip["worse_for"] == 1
    assert flip["rule"]["rolled_back"] == 1 and flip["rule"]["lose_gt_1"] == 0
    assert np.isclose(flip["rule"]["mean"], 5.0 / 3)
    assert s["signals"]["aug_gap"]["rule"]["rolled_back"] == 0  # unchanged is not worse
