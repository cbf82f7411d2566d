"""experiments/ttp_vs_shift.py re-scores a run's test persons at other shift strengths: they must be the same
persons."""
import argparse

import numpy as np

from core.frames import labeled_person_frames
from data.synth import main as synth_main
from experiments.ttp_vs_shift import shifted_test_persons, suffix
from model.config import load_config


def test_other_shift_renders_the_same_test_persons_with_other_pixels(tmp_path):
    run_data = str(tmp_path / "synth")
    synth_main(argparse.Namespace(out=run_data, persons=5, frames=4, size=64, seed=3, shift=0.3,
                                  shift_components="clothing,body,background", split="all", videos=2,
                                  extra_frames=6))
    cfg = load_config("configs/synth_small.yaml", [f"data.url={run_data}"])
    assert shifted_test_persons(cfg, 0.3, tmp_path) == run_data  # the run's own strength: its own data

    url = shifted_test_persons(cfg, 1.0, tmp_path)
    assert url != run_data
    same, shifted = labeled_person_frames(run_data, "test"), labeled_person_frames(url, "test")
    assert list(same) == list(shifted) and len(same) == 2
    pairs = [(a, b) for pid in same for a, b in zip(same[pid], shifted[pid], strict=True)]
    assert all((a.video_id, a.frame) == (b.video_id, b.frame) for a, b in pairs)
    # the same motion and camera: only the body's proportions move the joints, by a pixel or two
    assert np.mean([np.abs(a.keypoints[:, :2] - b.keypoints[:, :2]).mean() for a, b in pairs]) < 2.0
    assert np.mean([np.abs(a.image.astype(int) - b.image.astype(int)).mean() for a, b in pairs]) > 10
    assert shifted_test_persons(cfg, 1.0, tmp_path) == url  # written once, then reused


def test_a_partial_shift_names_its_components_whatever_their_order():
    assert suffix("clothing,body,background") == suffix("background, body,clothing") == ""
    assert suffix("background,clothing") == "-clothing+background"
