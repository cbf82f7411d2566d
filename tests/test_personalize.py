"""TTP mechanics: what is frozen stays frozen, online never looks ahead, persons start equal, deltas reproduce."""
import dataclasses
import time

import numpy as np
import pytest
import torch

from core.checkpoints import build_recon_loss
from model.config import load_config
from model.delta import apply_delta, decode_and_validate, deltable_keys, encode_delta, extract_delta
from model.network import build_model
from model.personalize import _Adapter, adaptable_parameters, draw_sources, personalize
from model.predict import predict_crops


def calibrate_norm_statistics(model, crops):
    """An untrained model's BatchNorm running stats (0/1) make eval-mode activations vanish; fit them."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(crops, crops)
    model.eval()


def keypoint_blind_copy(model, cfg):
    """A copy whose renderer gets the same keypoint code whatever the keypoints are (kp_encoder zeroed) and
    the source unwarped."""
    blind = build_model(dataclasses.replace(cfg.model, warp_sigma=0.0))
    blind.load_state_dict(model.state_dict())
    blind.eval()
    with torch.no_grad():
        for p in blind.kp_encoder.parameters():
            p.zero_()
    return blind


@pytest.fixture(scope="module")
def setup():
    cfg = load_config("configs/synth_small.yaml", ["ttp.steps=6", "ttp.batch_size=4", "ttp.lr=1e-3", "ttp.guard=false",
                                                     "ttp.min_pose_signal=0"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    recon = build_recon_loss(model, cfg)
    recon(torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64), update_means=True)
    gen = torch.Generator().manual_seed(1)
    crops = torch.rand(12, 3, 64, 64, generator=gen)
    calibrate_norm_statistics(model, crops)
    matrices = np.tile(np.array([[1.0, 0, 0], [0, 1.0, 0]]), (12, 1, 1))
    groups = np.repeat([0, 1], 6)
    return cfg, model, recon, crops, matrices, groups


@pytest.mark.parametrize("mirror_term", [{}, {"flip_weight": 100.0}, {"pseudo_label_weight": 100.0},
                                         {"teacher_weight": 100.0, "restore": 0.01},
                                         {"teacher_weight": 100.0, "recon_weight": 0.0}])
def test_only_encoder_and_self_head_non_norm_parameters_change(setup, mirror_term):
    """Also with the mirror terms, whose gradients reach the encoder through the frozen pose head."""
    cfg, model, recon, crops, matrices, groups = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ttp = dataclasses.replace(cfg.ttp, **mirror_term)
    result = personalize(model, recon, crops, matrices, groups, ttp, "offline", seed=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "base model was modified"
    adapted = {n for n, _ in adaptable_parameters(model, cfg.ttp.adapt)}
    changed = {k for k, v in result.state.items() if not torch.equal(before[k], v)}
    assert changed, "nothing adapted"
    assert changed <= adapted
    assert all(k.split(".")[0] in ("encoder", "self_head") for k in changed)
    assert not any("norm" in k or ".1.weight" in k and "net" in k for k in changed if "GroupNorm" in k)
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.GroupNorm, torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
            for p in ("weight", "bias"):
                key = f"{name}.{p}"
                if key in result.state:
                    assert torch.equal(result.state[key], before[key]), f"norm affine {key} changed"


@pytest.mark.parametrize("terms", [{}, {"teacher_weight": 100.0, "temporal_agreement": 1.0, "restore": 0.01}])
def test_online_never_looks_at_future_frames(setup, terms):
    cfg, model, recon, crops, matrices, groups = setup
    ttp = dataclasses.replace(cfg.ttp, **terms)
    a = personalize(model, recon, crops, matrices, groups, ttp, "online", seed=3)
    future_changed = crops.clone()
    future_changed[8:] = torch.rand(4, 3, 64, 64)
    b = personalize(model, recon, future_changed, matrices, groups, ttp, "online", seed=3)
    np.testing.assert_array_equal(a.predictions[:8], b.predictions[:8])


def test_the_teacher_averages_the_student_and_restore_returns_weights_to_the_base(setup):
    """The teacher trails the student (an average of its weights), and with every weight restored after each
    update but the last's the delta is that of one update at most."""
    cfg, model, recon, crops, matrices, groups = setup
    ttp = dataclasses.replace(cfg.ttp, teacher_weight=100.0, teacher_momentum=0.5)
    adapter = _Adapter(model, recon, ttp, seed=0)
    target, source = crops[:4], crops[4:8]
    adapter.step(target, source)
    for t, p, anchor in zip(adapter.teacher_params, adapter.params, adapter.anchors):
        torch.testing.assert_close(t, 0.5 * (p + anchor))  # one update, momentum 0.5: halfway
    restored = _Adapter(model, recon, dataclasses.replace(ttp, restore=0.999999), seed=0)
    restored.step(target, source)
    assert all(torch.equal(p, anchor) for p, anchor in zip(restored.params, restored.anchors))


def test_each_person_starts_from_identical_base_weights(setup):
    cfg, model, recon, crops, matrices, groups = setup
    first = personalize(model, recon, crops, matrices, groups, cfg.ttp, "offline", seed=5)
    personalize(model, recon, torch.rand_like(crops), matrices, groups, cfg.ttp, "offline", seed=9)
    again = personalize(model, recon, crops, matrices, groups, cfg.ttp, "offline", seed=5)
    np.testing.assert_array_equal(first.predictions, again.predictions)


def test_delta_extraction_and_application_reproduce_personalized_predictions(setup):
    cfg, model, recon, crops, matrices, groups = setup
    result = personalize(model, recon, crops, matrices, groups, cfg.ttp, "offline", seed=0)
    base = model.state_dict()
    keys = deltable_keys(base, {n for n, _ in model.named_parameters()})
    data = encode_delta(extract_delta(base, result.state, keys), "fp32", "sha", "p1", "offline", 6, 12)
    # a round trip, not the policy: lr 1e-3 on an untrained model moves single tensors far beyond honest TTP
    delta, meta = decode_and_validate(data, base, set(keys), "sha", tensor_norm_bound=float("inf"))
    assert all(k.startswith(("encoder.", "self_head.")) for k in delta)
    restored = build_model(cfg.model)
    restored.load_state_dict(apply_delta(base, delta))
    np.testing.assert_allclose(predict_crops(restored, crops, matrices), result.predictions, atol=1e-4)


def test_trust_region_bounds_every_weight_and_binds(setup):
    cfg, model, recon, crops, matrices, groups = setup
    bounded, unbounded = dataclasses.replace(cfg.ttp, drift_steps=2.0), dataclasses.replace(cfg.ttp, drift_steps=0)
    base = model.state_dict()
    radius = bounded.drift_radius
    assert radius == 2.0 * bounded.lr and unbounded.drift_radius == float("inf")
    for scenario in ("offline", "online"):
        free = personalize(model, recon, crops, matrices, groups, unbounded, scenario, seed=0).state
        kept = personalize(model, recon, crops, matrices, groups, bounded, scenario, seed=0).state
        names = [n for n, _ in adaptable_parameters(model, cfg.ttp.adapt)]
        for name in names:
            assert (kept[name] - base[name]).abs().max() <= radius * (1 + 1e-5), name
        # unbounded, the same run goes further than the region allows: the bound is what held it
        assert max(float((free[n] - base[n]).abs().max()) for n in names) > radius


def test_guard_rolls_back_a_diverging_person(setup):
    cfg, model, recon, crops, matrices, groups = setup
    wild = load_config("configs/synth_small.yaml", ["ttp.steps=20", "ttp.batch_size=4", "ttp.lr=1.0",
                                                    "ttp.guard_window=2", "ttp.guard_ratio=1.05"]).ttp
    result = personalize(model, recon, crops, matrices, groups, wild, "offline", seed=0)
    assert result.metrics["guard_events"] >= 1
    assert result.metrics["steps"] < 20  # no update after the rollback
    assert result.metrics["loss_after"] <= 1.05 * result.metrics["loss_before"] + 1e-6


def test_pose_signal_check_keeps_the_base_when_the_loss_ignores_the_keypoints(setup):
    cfg, model, recon, crops, matrices, groups = setup
    blind = keypoint_blind_copy(model, cfg)
    checked = load_config("configs/synth_small.yaml", ["ttp.steps=6", "ttp.batch_size=4", "ttp.lr=1e-3",
                                                       "ttp.guard=false", "ttp.min_pose_signal=1.02"]).ttp
    result = personalize(blind, recon, crops, matrices, groups, checked, "offline", seed=0)
    assert result.metrics["pose_signal"] == pytest.approx(1.0, abs=1e-4)
    assert result.metrics["guard_events"] == 1 and result.metrics["steps"] == 0
    assert all(torch.equal(v, blind.state_dict()[k]) for k, v in result.state.items())
    np.testing.assert_array_equal(result.predictions, predict_crops(blind, crops, matrices))


def test_online_waits_for_the_pose_signal_before_adapting(setup):
    cfg, model, recon, crops, matrices, groups = setup
    checked = load_config("configs/synth_small.yaml", ["ttp.batch_size=4", "ttp.lr=1e-2", "ttp.guard=false",
                                                       "ttp.min_pose_signal=0.5", "ttp.signal_frames=9"]).ttp
    groups = np.zeros(len(crops), np.int64)
    result = personalize(model, recon, crops, matrices, groups, checked, "online", seed=0)
    base = predict_crops(model, crops, matrices)
    assert result.metrics["pose_signal"] is not None and result.metrics["pose_signal"] >= 0.5
    # frames 0..7: nothing adapted yet (sub-pixel decoding shows the float noise of batch 1 vs a batch: 1e-4 px)
    np.testing.assert_allclose(result.predictions[:8], base[:8], atol=1e-3)
    assert np.abs(result.predictions[8:] - base[8:]).max() > 1e-2
    assert result.metrics["steps"] == len(crops) - 8  # one update per frame from frame 8 on


def test_confidence_guard_rolls_back_when_the_pose_head_grows_less_sure(setup):
    cfg, model, recon, crops, matrices, groups = setup

    def run(guard_confidence):
        ttp = load_config("configs/synth_small.yaml", [
            "ttp.steps=6", "ttp.batch_size=4", "ttp.lr=1e-3", "ttp.guard_window=2", "ttp.guard_ratio=1e9",
            "ttp.min_pose_signal=0", f"ttp.guard_confidence={guard_confidence}"]).ttp
        return personalize(model, recon, crops, matrices, groups, ttp, "offline", seed=0)

    free = run(0)  # the loss criterion can never fire (ratio 1e9): without the confidence test it adapts
    assert free.metrics["guard_events"] == 0
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in free.state.items())
    strict = run(1e6)  # no adapted model can be a million times surer than the base: the first check rolls back
    assert strict.metrics["guard_events"] == 1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in strict.state.items())


def test_realtime_frame_stream_grows_without_changing_what_was_handed_out():
    from model.realtime import FrameStream

    stream, crops = FrameStream(capacity=4), torch.rand(11, 3, 8, 8)
    early = None
    for i, crop in enumerate(crops):
        assert stream.append(crop, i // 5) == i
        if i == 2:
            early = stream.upto(2)  # a view the adaptation thread might still hold when the buffer grows
    frames, groups = stream.upto(10)
    assert torch.equal(frames, crops) and groups.tolist() == [0] * 5 + [1] * 5 + [2]
    assert torch.equal(early[0], crops[:3]) and early[1].tolist() == [0, 0, 0]
    assert len(stream.frames) == 16  # 4 -> 8 -> 16: doubled, not grown per frame


def test_realtime_mode_applies_the_pose_signal_check(setup):
    from model.realtime import RealtimePersonalizer

    cfg, model, recon, crops, matrices, groups = setup
    blind = keypoint_blind_copy(model, cfg)
    runs = {}
    for name, signal in (("checked", 1.02), ("unchecked", 0.0)):
        ttp = load_config("configs/synth_small.yaml", ["ttp.batch_size=4", f"ttp.min_pose_signal={signal}",
                                                       "ttp.signal_frames=3"]).ttp
        rt = RealtimePersonalizer(blind, recon, ttp)
        try:
            for i in range(len(crops)):
                rt.predict(crops[i], matrices[i], int(groups[i]))
                deadline = time.monotonic() + 10
                while not rt._queue.empty() and time.monotonic() < deadline:  # pace the stream: every frame
                    time.sleep(0.01)  # reaches the adapter thread
                time.sleep(0.05)
        finally:
            rt.close()
        runs[name] = rt
    assert runs["checked"].adapter.pose_signal == pytest.approx(1.0, abs=1e-4)
    assert runs["checked"].updates == 0  # the loss ignores the keypoints: never adapt
    assert runs["unchecked"].updates > 0


@pytest.mark.parametrize("amp", ["bf16", "off"])
def test_fast_step_matches_the_fp32_step_and_returns_standard_layout_weights(setup, amp):
    """The product step (channels-last copy, bf16 autocast) starts from the fp32 step's loss (bf16 to 1 %), and
    the personalized state it returns is in the standard layout (safetensors refuses anything else)."""
    from dataclasses import replace

    from model.personalize import _Adapter

    cfg, model, recon, crops, matrices, groups = setup
    plain = replace(cfg.ttp, amp="off", channels_last=False)
    fast = replace(cfg.ttp, amp=amp, channels_last=True)
    target, source = crops[:4], crops[4:8]
    reference = _Adapter(model, recon, plain).step(target, source)
    assert _Adapter(model, recon, fast).step(target, source) == pytest.approx(reference, rel=1e-2 if amp == "bf16"
                                                                               else 1e-5)
    result = personalize(model, recon, crops, matrices, groups, fast, "offline", seed=0)
    assert all(v.is_contiguous() for v in result.state.values())
    assert result.metrics["steps"] == cfg.ttp.steps


def test_rotation_variant_personalizes_the_same_whatever_the_global_rng(setup):
    """Its rotations come from the TTP seed: a person's result never depends on what ran before it."""
    cfg, _, _, crops, matrices, groups = setup
    rot_cfg = load_config("configs/synth_small.yaml", ["model.variant=shared_rotation", "ttp.steps=6",
                                                       "ttp.batch_size=4", "ttp.lr=1e-3", "ttp.guard_window=2"])
    torch.manual_seed(0)
    model = build_model(rot_cfg.model).eval()
    results = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        results.append(personalize(model, None, crops, matrices, groups, rot_cfg.ttp, "offline", seed=0))
    assert results[0].metrics["steps"] > 0
    assert all(torch.equal(v, results[1].state[k]) for k, v in results[0].state.items())
    assert results[0].metrics["loss_before"] == results[1].metrics["loss_before"]
    assert results[0].metrics["loss_after"] == results[1].metrics["loss_after"]


def test_cross_video_sources_come_from_earlier_frames_of_other_videos():
    groups = np.repeat([0, 1, 2], 4)
    gen = torch.Generator().manual_seed(0)
    targets = np.full(200, 9)  # video 2; frames 0-7 are videos 0 and 1
    assert set(draw_sources(groups, targets, limit=9, gen=gen, cross_video=1.0)) == set(range(8))
    half = draw_sources(groups, targets, limit=9, gen=gen, cross_video=0.5)
    assert set(half) <= set(range(9)) and 60 < (half == 8).sum() < 140  # about half from its own earlier frame
    assert set(draw_sources(groups, targets, limit=9, gen=gen)) == {8}
    # where no other video is there yet, the source comes from the target's own video
    assert set(draw_sources(groups, np.full(20, 2), limit=2, gen=gen, cross_video=1.0)) <= {0, 1}


def test_online_with_cross_video_sources_never_looks_at_future_frames(setup):
    cfg, model, recon, crops, matrices, groups = setup
    ttp = dataclasses.replace(cfg.ttp, cross_video=0.5)
    a = personalize(model, recon, crops, matrices, groups, ttp, "online", seed=3)
    future_changed = crops.clone()
    future_changed[8:] = torch.rand(4, 3, 64, 64)
    b = personalize(model, recon, future_changed, matrices, groups, ttp, "online", seed=3)
    np.testing.assert_array_equal(a.predictions[:8], b.predictions[:8])
    same_video = personalize(model, recon, crops, matrices, groups, dataclasses.replace(cfg.ttp, cross_video=0.0),
                             "online", seed=3)
    assert not np.array_equal(a.predictions[7:], same_video.predictions[7:])  # video 1 also learnt from video 0


@pytest.mark.parametrize("mirror_term", ["flip_weight", "pseudo_label_weight"])
def test_mirror_terms_change_the_update_and_keep_the_base_free_of_them(setup, mirror_term):
    cfg, model, recon, crops, matrices, groups = setup
    plain = personalize(model, recon, crops, matrices, groups, cfg.ttp, "offline", seed=0).state
    ttp = dataclasses.replace(cfg.ttp, **{mirror_term: 100.0})
    with_term = personalize(model, recon, crops, matrices, groups, ttp, "offline", seed=0).state
    assert any(not torch.equal(plain[k], with_term[k]) for k in plain if k.startswith("encoder."))
    assert all(torch.equal(plain[k], with_term[k]) for k in plain if k.startswith(("sup_head.", "renderer.")))


def test_low_rank_ttp_changes_each_weight_at_that_rank_and_its_delta_round_trips(setup):
    """ttp.delta_rank: every adapted weight's change has rank <= r, and the factor delta a client files rebuilds
    it (int8 rounding aside) through the delta policy's reader."""
    cfg, model, recon, crops, matrices, groups = setup
    ttp = dataclasses.replace(cfg.ttp, delta_rank=2, drift_steps=20)
    result = personalize(model, recon, crops, matrices, groups, ttp, "offline", seed=0)
    base = model.state_dict()
    adapted = dict(adaptable_parameters(model, ttp.adapt))
    changes = {k: result.state[k] - base[k] for k in adapted}
    assert any(torch.count_nonzero(v) for v in changes.values()), "nothing adapted"
    for k, v in changes.items():
        if v.ndim > 1:
            assert int(torch.linalg.matrix_rank(v.reshape(v.shape[0], -1).double(), rtol=1e-5)) <= 2, k
        assert float(v.abs().max()) <= ttp.drift_radius * (1 + 1e-5), k
    keys = deltable_keys(base, {n for n, _ in model.named_parameters()})
    delta = extract_delta(base, result.state, keys)
    data = encode_delta(delta, "fp32", "sha", "p1", "offline", 6, 12, rank=2, max_abs=ttp.drift_radius)
    assert len(data) < 0.2 * len(encode_delta(delta, "fp32", "sha", "p1", "offline", 6, 12))
    rebuilt, _ = decode_and_validate(data, base, set(keys), "sha", max_abs=ttp.drift_radius)
    for k, v in delta.items():
        torch.testing.assert_close(rebuilt[k], v, atol=1e-6 * ttp.drift_radius + 1e-9, rtol=1e-4)


def test_norm_and_bias_only_adapts_the_norm_affines_and_biases_alone(setup):
    cfg, model, recon, crops, matrices, groups = setup
    ttp = dataclasses.replace(cfg.ttp, norm_and_bias_only=True)
    result = personalize(model, recon, crops, matrices, groups, ttp, "offline", seed=0)
    base = model.state_dict()
    changed = {k for k, v in result.state.items() if not torch.equal(base[k], v)}
    norms = {f"{name}.{p}" for name, m in model.named_modules()
             if isinstance(m, (torch.nn.GroupNorm, torch.nn.BatchNorm2d, torch.nn.LayerNorm)) for p in ("weight", "bias")}
    assert changed and all(k in norms or k.endswith(".bias") for k in changed), changed
    assert any(k in norms for k in changed) and all(k.startswith(("encoder.", "self_head.")) for k in changed)
