"""The statistics `posettp reproduce` prints, on hand-made evaluations (fast: no model)."""
import pytest

from training.reproduce import gains_per_person


def evaluation(pck: dict[str, float]) -> dict:
    return {"persons": [{"person_id": person, "pck@0.2": value} for person, value in pck.items()]}


def test_gains_per_person_average_each_persons_gain_over_the_seeds():
    without = [evaluation({"a": 0.50, "b": 0.60}), evaluation({"b": 0.70, "a": 0.40})]  # order differs by seed
    with_ttp = [evaluation({"a": 0.47, "b": 0.62}), evaluation({"a": 0.42, "b": 0.73})]
    gains = gains_per_person(list(zip(without, with_ttp)), "pck@0.2")
    assert gains == pytest.approx({"a": (-0.03 + 0.02) / 2, "b": (0.02 + 0.03) / 2})
    # person a loses 3 points on the first seed, but half a point over the seeds: not a person worse by > 1
    assert gains["a"] > -0.01
