"""One training path: every trainer builds the same setup and batches; training pairs and TTP share one augmentation."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_personalize import setup  # noqa: F401  (the module fixture: a calibrated toy model and 12 crops)

from data.pairs import PairDataset
from data.shards import Frame
from model.augment import Augmentation
from model.config import DataConfig, load_config
from model.personalize import draw_pairs, personalize, shared_augment
from training.data import batch_stream, labeled
from training.local import train_local
from training.loop import build_training, train_step

# train.threads=0: leave this process's thread count alone
TOY = ["model.image_size=64", "train.batch_size=2", "train.max_steps=2", "train.threads=0", "train.amp=off"]


def _frames(n: int, unlabeled: int = 0) -> list[Frame]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n + unlabeled):
        kp = np.concatenate([rng.uniform(30, 70, (13, 2)), np.ones((13, 1))], axis=1).astype(np.float32)
        if i >= n:
            kp[:] = 0
        out.append(Frame("p0", f"v{i % 2}", i, rng.integers(0, 255, (120, 100, 3), dtype=np.uint8), kp,
                         np.array([25, 20, 50, 70], np.float32), "train"))
    return out


# ------------------------------------------------------------------------------------------------
# one setup and one batch stream
# ------------------------------------------------------------------------------------------------

def test_build_training_is_seeded_in_the_training_layout_with_adam_over_every_trainable_weight():
    cfg = load_config("configs/synth_small.yaml", TOY)
    model, recon, optimizer = build_training(cfg)
    again, _, _ = build_training(cfg)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    assert model.training and recon is not None
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == trainable
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.param_groups[0]["lr"] == cfg.train.lr
    baseline = load_config("configs/synth_small.yaml", TOY + ["model.variant=baseline"])
    assert build_training(baseline)[1] is None  # no reconstruction task, no loss


def test_train_local_is_the_shared_setup_and_the_step_addressed_stream():
    """`posettp reproduce` trains what a Ray worker's loop would on the same frames: same setup, batches and step
    (unlabeled frames skipped)."""
    cfg = load_config("configs/synth_small.yaml", TOY)
    frames = _frames(6, unlabeled=2)
    trained, _, history = train_local(cfg, frames, progress=False)
    model, recon, optimizer = build_training(cfg)
    batches = batch_stream(labeled(frames), cfg, rank=0, start_step=0)
    for step in range(cfg.train.max_steps):
        train_step(model, recon, optimizer, next(batches), step, cfg)
    assert len(history) == 2 and all(np.isfinite(h["loss"]) for h in history)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in trained.state_dict().items())


# ------------------------------------------------------------------------------------------------
# one augmentation
# ------------------------------------------------------------------------------------------------

def test_augmentation_defaults_are_the_data_settings_and_from_data_reads_them():
    assert Augmentation() == Augmentation.from_data(DataConfig())
    custom = DataConfig(scale_std=0.1, rot_std=5.0, rot_prob=0.2, flip_prob=0.9)
    assert Augmentation.from_data(custom) == Augmentation(0.1, 5.0, 0.2, 0.9)
    assert PairDataset(_frames(2), 64, custom).aug == Augmentation.from_data(custom)


def _fixed_parameter_ttp_augment(target, source, gen):
    """TTP's augmentation as it was before it read data.*: the constants 0.25, 30 and 0.6."""
    b = target.shape[0]
    scale = (1 + torch.randn(b, generator=gen) * 0.25).clamp(0.75, 1.25)
    rot = (torch.randn(b, generator=gen) * 30.0).clamp(-60, 60)
    rot = torch.where(torch.rand(b, generator=gen) < 0.6, rot, torch.zeros_like(rot))
    a = torch.deg2rad(rot)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(a) * scale, -torch.sin(a) * scale
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(a) * scale, torch.cos(a) * scale
    grid = F.affine_grid(theta.to(target), list(target.shape), align_corners=False)
    return F.grid_sample(target, grid, align_corners=False), F.grid_sample(source, grid, align_corners=False)


def _fixed_parameter_pair_draw(rng):
    """The pair dataset's draw as it was before `model.augment` (DataConfig defaults)."""
    scale = float(np.clip(rng.normal(1.0, 0.25), 0.75, 1.25))
    rot = float(np.clip(rng.normal(0.0, 30.0), -60, 60)) if rng.random() < 0.6 else 0.0
    return scale, rot, bool(rng.random() < 0.5)


def test_default_augmentation_is_bit_identical_to_the_former_fixed_one():
    images = torch.rand(2, 16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for seed in range(5):
        new = shared_augment(images[0], images[1], torch.Generator().manual_seed(seed))
        old = _fixed_parameter_ttp_augment(images[0], images[1], torch.Generator().manual_seed(seed))
        assert all(torch.equal(a, b) for a, b in zip(new, old))
        rngs = np.random.default_rng([seed, 1]), np.random.default_rng([seed, 1])
        assert [Augmentation().draw(rngs[0]) for _ in range(20)] == [_fixed_parameter_pair_draw(rngs[1])
                                                                     for _ in range(20)]


def test_ttp_pairs_follow_the_data_settings(setup):  # noqa: F811
    cfg, model, recon, crops, matrices, groups = setup
    still = Augmentation.from_data(DataConfig(scale_std=0.0, rot_prob=0.0))
    targets = np.arange(6, 12)
    target, _ = draw_pairs(crops, groups, targets, 12, torch.Generator().manual_seed(0), augment=still)
    torch.testing.assert_close(target, crops[targets], atol=1e-5, rtol=0)  # no rotation, scale 1: the crops
    moved, _ = draw_pairs(crops, groups, targets, 12, torch.Generator().manual_seed(0))
    assert (moved - crops[targets]).abs().max() > 0.1
    plain = personalize(model, recon, crops, matrices, groups, cfg.ttp, "offline", seed=0)
    default = personalize(model, recon, crops, matrices, groups, cfg.ttp, "offline", seed=0,
                          augment=Augmentation.from_data(cfg.data))
    unaugmented = personalize(model, recon, crops, matrices, groups, cfg.ttp, "offline", seed=0, augment=still)
    assert all(torch.equal(v, default.state[k]) for k, v in plain.state.items())
    assert any(not torch.equal(v, unaugmented.state[k]) for k, v in plain.state.items())


@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_ttp_never_flips(flip_prob):
    """Only the pair dataset mirrors (it swaps the joints); a TTP pair gets rotation and scale alone."""
    images = torch.rand(2, 4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    augment = Augmentation(scale_std=0.0, rot_prob=0.0, flip_prob=flip_prob)
    target, _ = shared_augment(images[0], images[1], torch.Generator().manual_seed(0), augment)
    torch.testing.assert_close(target, images[0], atol=1e-5, rtol=0)


def test_a_fine_tune_starts_from_its_checkpoint_and_refuses_other_model_settings(tmp_path):
    """train.init_from: the checkpoint's weights and loss statistics, not the seed's; a checkpoint of another
    model (not merely another decoding) is refused naming the settings that differ."""
    from model.checkpoint import save_checkpoint
    from model.config import ConfigError

    cfg = load_config("configs/synth_small.yaml", TOY + ["train.seed=3"])
    trained, recon, _ = build_training(cfg)
    with torch.no_grad():
        next(trained.parameters()).add_(0.5)
    save_checkpoint(str(tmp_path / "ck"), trained, cfg, 2, loss_module=recon)
    fresh, _, _ = build_training(load_config("configs/synth_small.yaml", TOY))
    tuned, _, _ = build_training(load_config("configs/synth_small.yaml", TOY + [
        f"train.init_from={tmp_path / 'ck'}", "model.flip_test=true"]))
    state, theirs = tuned.state_dict(), trained.state_dict()
    assert all(torch.equal(state[k], theirs[k]) for k in state)
    assert not all(torch.equal(state[k], v) for k, v in fresh.state_dict().items())
    with pytest.raises(ConfigError, match=r"other model settings \(model.ffn\)"):
        build_training(load_config("configs/synth_small.yaml", TOY + [f"train.init_from={tmp_path / 'ck'}",
                                                                      "model.ffn=128"]))
