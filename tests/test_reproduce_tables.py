"""The statistics `posettp reproduce` prints, on hand-made evaluations (fast: no model)."""
import argparse

import pytest

import numpy as np

from data.synth import main as synth_main
from model.config import load_config
from training.reproduce import Experiment, gain_summary, gains_per_person


def evaluation(pck: dict[str, float]) -> dict:
    return {"persons": [{"person_id": person, "pck@0.2": value} for person, value in pck.items()]}


def test_gains_per_person_average_each_persons_gain_over_the_seeds():
    without = [evaluation({"a": 0.50, "b": 0.60}), evaluation({"b": 0.70, "a": 0.40})]  # order differs by seed
    with_ttp = [evaluation({"a": 0.47, "b": 0.62}), evaluation({"a": 0.42, "b": 0.73})]
    gains = gains_per_person(list(zip(without, with_ttp)), "pck@0.2")
    assert gains == pytest.approx({"a": (-0.03 + 0.02) / 2, "b": (0.02 + 0.03) / 2})
    # person a loses 3 points on the first seed, but half a point over the seeds: not a person worse by > 1
    assert gains["a"] > -0.01


def test_gain_summary_clusters_its_standard_error_by_person():
    """Two persons, three seeds: the per-seed gains of a person are alike, so treating the six pairs as
    independent would shrink the standard error; the summary's is that of the two per-person means."""
    without = [evaluation({"a": 0.50, "b": 0.50})] * 3
    with_ttp = [evaluation({"a": 0.52 + d, "b": 0.56 + d}) for d in (0.0, 0.001, -0.001)]
    summary = gain_summary(list(zip(without, with_ttp)), "pck@0.2")
    assert summary["gain_mean"] == pytest.approx(0.04)
    assert summary["gain_se"] == pytest.approx(0.02)  # std (ddof 1) of 0.02 and 0.06 over sqrt(2)
    assert summary["persons"] == 2 and summary["pairs"] == 6 and summary["persons_worse_1pck_over_seeds"] == 0
    pairs_se = np.std([0.02, 0.021, 0.019, 0.06, 0.061, 0.059], ddof=1) / np.sqrt(6)
    assert summary["gain_se"] > 1.5 * pairs_se


def test_an_online_only_setting_names_a_new_online_evaluation_and_the_same_offline_one(tmp_path):
    """`ttp.temporal_agreement` gates online updates only: offline, a run that differs by it alone is the cached
    run, online it is evaluated apart."""
    data = str(tmp_path / "synth")
    synth_main(argparse.Namespace(out=data, persons=3, frames=2, size=64, seed=0, shift=0.3,
                                  shift_components="clothing,body,background", split="all", videos=1,
                                  extra_frames=0))
    teacher = [f"data.url={data}", "ttp.teacher_weight=300"]
    plain = Experiment(load_config("synth_small", teacher), tmp_path / "out", 1)
    temporal = Experiment(load_config("synth_small", [*teacher, "ttp.temporal_agreement=1"]), tmp_path / "out", 1)
    assert plain.evaluation_path("transformer", 0, "offline") == temporal.evaluation_path("transformer", 0, "offline")
    assert plain.evaluation_path("transformer", 0, "online") != temporal.evaluation_path("transformer", 0, "online")
