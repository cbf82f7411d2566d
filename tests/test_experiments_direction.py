"""experiments/ttp_direction.py takes TTP's update apart: the sign-flipped null must keep every magnitude, the seeds'
mean delta must be an element-wise mean, and persons left at the base weights must stay out of every statistic."""
import torch

from experiments.ttp_direction import mean_delta, sign_flipped, summary


def test_sign_flipped_keeps_every_magnitude_and_draws_the_signs():
    delta = {"encoder.w": torch.linspace(0.1, 1.0, 1000).reshape(10, 100), "self_head.b": torch.full((7,), -2.0)}
    flipped = sign_flipped(delta, torch.Generator().manual_seed(0))
    assert flipped.keys() == delta.keys()
    for k in delta:
        assert torch.equal(flipped[k].abs(), delta[k].abs())
    agree = (torch.sign(flipped["encoder.w"]) == torch.sign(delta["encoder.w"])).float().mean().item()
    assert 0.4 < agree < 0.6


def test_mean_delta_counts_an_unchanged_tensor_as_zero():
    a = {"w": torch.tensor([1.0, -2.0]), "b": torch.tensor([3.0])}
    b = {"w": torch.tensor([3.0, 0.0])}
    m = mean_delta([a, b])
    assert torch.equal(m["w"], torch.tensor([2.0, -1.0])) and torch.equal(m["b"], torch.tensor([1.5]))


def test_summary_scores_kept_persons_at_base_and_tells_noise_from_systematic_losses():
    rows = [{"none": 0.50, "adapted": [True, True], "ttp": [0.53, 0.47], "mean_delta": 0.51,
             "flipped": [0.50, 0.495]},
            {"none": 0.60, "adapted": [True, True], "ttp": [0.58, 0.585], "mean_delta": 0.58,
             "flipped": [0.605, 0.60]},
            {"none": 0.70, "adapted": [False, True], "ttp": [0.70, 0.75], "mean_delta": 0.72}]
    s = summary(rows)
    assert s["adapted_per_ttp_seed"] == [2, 3] and s["adapted_under_every_ttp_seed"] == 2
    assert [x["n"] for x in s["ttp_per_seed"]] == [3, 3] and s["sign_flipped"]["n"] == 4
    assert abs(s["ttp_per_seed"][0]["mean"] - 1 / 3) < 1e-9  # +3, -2 and the kept person's 0
    assert abs(s["ttp_first_seed_same_persons"]["mean"] - 0.5) < 1e-9
    assert abs(s["sign_flipped"]["mean"]) < 1e-9 and s["sign_flipped"]["move_gt_1"] == 0.0
    consistency = s["seed_consistency"]  # over the two persons both seeds adapted
    assert consistency["lose_gt_1_under_any_seed"] == 2 and consistency["lose_gt_1_under_every_seed"] == 1
