"""experiments/ttp_signal.py measures what the TTP loss can see; its two oracles and its keypoint offsets are checked
here."""
import numpy as np
import torch

from core.checkpoints import build_recon_loss
from data.shards import Frame
from experiments.ttp_signal import bias_free_pck, loss_response, synth_pck
from model.config import load_config
from model.network import PoseTTPNet, build_model
from tests.test_personalize import calibrate_norm_statistics, keypoint_blind_copy


def test_bias_free_pck_removes_a_steady_offset_per_group_but_not_frame_noise():
    rng = np.random.default_rng(0)
    gt = rng.uniform(0, 100, (40, 13, 2))
    gt[:, 1], gt[:, 2], gt[:, 7], gt[:, 8] = [40, 30], [60, 30], [42, 70], [58, 70]  # torso length 40
    vis = np.ones((40, 13))
    groups = np.repeat([0, 1], 20)
    offsets = np.where(groups[:, None, None] == 0, 12.0, -12.0) * np.ones((1, 13, 2))  # beyond 0.2 x torso
    assert synth_pck(gt + offsets, gt, vis) == 0.0
    assert bias_free_pck(gt + offsets, gt, vis, groups) == 1.0
    assert bias_free_pck(gt + offsets, gt, vis, np.zeros(40)) == 0.0  # one group: the two offsets cancel out
    noisy = gt + rng.normal(0, 10, gt.shape)
    assert bias_free_pck(noisy, gt, vis, groups) < 1.0


def _frames(n=8):
    rng = np.random.default_rng(0)
    out = []
    for t in range(n):
        kp = np.concatenate([rng.uniform(30, 70, (13, 2)), np.ones((13, 1))], axis=1).astype(np.float32)
        image = rng.integers(0, 255, (100, 100, 3), dtype=np.uint8)
        out.append(Frame("p0", "v0", t, image, kp, np.array([20, 20, 60, 60], np.float32), "test"))
    return out


def test_loss_response_is_one_for_a_keypoint_blind_model_and_restores_the_class():
    cfg = load_config("configs/synth_small.yaml")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    recon = build_recon_loss(model, cfg)
    frames = _frames()
    calibrate_norm_statistics(model, torch.rand(8, 3, 64, 64))
    recon(torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64), update_means=True)
    recon.eval()
    seeing = loss_response(model, recon, frames, 64, draws=1, batch=4)
    assert type(model) is PoseTTPNet and "offset" not in vars(model)
    assert seeing["offset_1"] != 1.0  # the warped skip moves pixels along the (offset) keypoints
    blind = loss_response(keypoint_blind_copy(model, cfg), recon, frames, 64, draws=1, batch=4)
    assert blind["swap"] == 1.0 and blind["offset_0.5"] == 1.0 and blind["offset_1"] == 1.0
