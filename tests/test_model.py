"""The network, heatmaps, metrics and checkpoints: tests that catch a wrong re-implementation."""
import numpy as np
import pytest
import torch

from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.config import DECODINGS, ConfigError, load_config
from model.heatmaps import (DECODERS, decode_argmax, decode_dark, gaussian_maps, gaussian_profiles, heatmap_to_image,
                            image_to_heatmap, marginal_soft_argmax)
from model.losses import ReconstructionLoss
from model.joints import BBC, COCO, H36M, PENN, JointSet, joint_set
from model.metrics import bbc_macc, pck, torso_lengths
from model.network import ConvEncoder, build_model, parameter_counts
from model.objectives import flip_consistency, mirror_pseudo_labels
from model.predict import mirrored_heatmaps
from model.transforms import crop_matrix


def small_cfg(variant="transformer"):
    return load_config("configs/synth_small.yaml", [f"model.variant={variant}"])


def test_transformer_sup_heatmaps_are_affinity_times_self_heatmaps():
    torch.manual_seed(0)
    model = build_model(small_cfg().model).eval()
    out = model.pose(torch.rand(2, 3, 64, 64))
    w, h_self = out["affinity"], out["h_self"]
    assert w.shape == (2, 13, 30)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 13))
    expected = (w.unsqueeze(-1).unsqueeze(-1) * h_self.unsqueeze(1)).sum(2)
    torch.testing.assert_close(out["h_sup"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backbone,total", [("resnet18", 21_194_367), ("resnet50", 39_817_343)])
def test_paper_size_parameter_counts_match_released_models(backbone, total):
    cfg = load_config("configs/penn_res50.yaml", [f"model.backbone={backbone}"])
    counts = parameter_counts(build_model(cfg.model))
    assert counts["total"] == total
    assert set(counts) == {"encoder", "self_head", "sup_head", "appearance", "kp_encoder", "renderer", "total"}


@pytest.mark.parametrize("variant", ["baseline", "shared_rotation", "shared_keypoint", "transformer"])
def test_all_variants_build_with_contract_names(variant):
    model = build_model(small_cfg(variant).model)
    names = {n for n, _ in model.named_children()}
    assert {"encoder", "sup_head"} <= names
    assert ("self_head" in names) == (variant in ("shared_keypoint", "transformer"))
    assert ("rotation_head" in names) == (variant == "shared_rotation")


def test_soft_argmax_of_a_delta_peak_returns_its_location():
    logits = torch.full((1, 2, 16, 16), -1e4)
    logits[0, 0, 5, 11] = 1e4  # y=5, x=11
    logits[0, 1, 0, 15] = 1e4
    coords = marginal_soft_argmax(logits)
    torch.testing.assert_close(coords[0], torch.tensor([[11.0, 5.0], [15.0, 0.0]]))


def test_decode_of_encoded_joints_within_quarter_heatmap_pixel():
    """Argmax + quarter offset resolves 0.25 heatmap px: at 128x128 (stride 4) that is 1 image px per axis."""
    rng = np.random.default_rng(0)
    joints = torch.tensor(rng.uniform(8, 120, size=(50, 13, 2)), dtype=torch.float32)
    on_grid = image_to_heatmap(joints, 128, 32)
    coords, score = decode_argmax(gaussian_maps(on_grid, 32, 2.0))
    assert (coords - on_grid).abs().max() <= 0.25 + 1e-5
    assert (heatmap_to_image(coords, 128, 32) - joints).abs().max() <= 1.0 + 1e-4
    assert torch.all(score > 0.5)


def test_dark_decoding_finds_sub_pixel_peaks_the_quarter_shift_cannot():
    """On Gaussians at random sub-pixel positions (16x16, synth_small's grid) DARK lands within 0.001 heatmap px;
    the quarter shift's error is up to 0.25 and several times larger on average."""
    rng = np.random.default_rng(1)
    on_grid = torch.tensor(rng.uniform(3, 12, size=(40, 13, 2)), dtype=torch.float32)  # off the blur's padding
    maps = gaussian_maps(on_grid, 16, 2.0)
    coords, score = decode_dark(maps)
    quarter, quarter_score = decode_argmax(maps)
    assert (coords - on_grid).abs().max() < 1e-3
    assert (quarter - on_grid).abs().mean() > 4 * (coords - on_grid).abs().mean()
    torch.testing.assert_close(score, quarter_score)  # the same peak values: the confidence guard is unchanged


def test_dark_decoding_keeps_the_argmax_where_there_is_no_peak_to_fit():
    maps = torch.zeros(1, 3, 16, 16)
    maps[0, 0] = -1.0  # flat (a joint the network does not see)
    maps[0, 1, 0, 5] = 1.0  # peak on the border: no neighbour on one side
    maps[0, 2, 7, 7] = 1.0  # one hot pixel: flat beside it after the floor
    maps[0, 2, 7, 8] = 0.5
    coords, _ = decode_dark(maps)
    assert torch.isfinite(coords).all()
    torch.testing.assert_close(coords[0, :2], torch.tensor([[0.0, 0.0], [5.0, 0.0]]))
    assert 7.0 < coords[0, 2, 0] <= 8.0 and abs(coords[0, 2, 1] - 7.0) < 1e-5


def test_predictions_decode_as_the_model_config_says():
    from model.predict import predict_crops

    assert set(DECODERS) == set(DECODINGS) and small_cfg().model.decode == "dark"
    with pytest.raises(ConfigError, match="model.decode must be one of"):
        load_config("configs/synth_small.yaml", ["model.decode=softargmax"])
    torch.manual_seed(0)
    model = build_model(small_cfg().model).eval()
    crops, matrices = torch.rand(3, 3, 64, 64), np.tile(np.eye(3)[:2], (3, 1, 1)).astype(np.float32)
    with torch.no_grad():
        h_sup = model.pose(crops)["h_sup"].float()
    for name, decode in DECODERS.items():
        model.cfg.decode = name
        expected = heatmap_to_image(decode(h_sup)[0], 64, h_sup.shape[-1]).numpy()
        np.testing.assert_allclose(predict_crops(model, crops, matrices)[..., :2], expected, atol=1e-4)
    assert not np.allclose(decode_dark(h_sup)[0], decode_argmax(h_sup)[0])



def test_flip_test_averages_with_the_mirror_so_a_mirrored_crop_gives_the_same_pose():
    """With model.flip_test, each crop's heatmaps are averaged with its mirror's: the mirrored crop (its affine
    mirrored too) then predicts the same joints in the original image, left and right swapped back — exactly, where
    a single pass differs by pixels."""
    from model.predict import predict_crops

    with pytest.raises(ConfigError, match="model.num_joints is 5 but the penn joint set has 13 joints"):
        load_config("configs/synth_small.yaml", ["model.flip_test=true", "model.num_joints=5"])
    torch.manual_seed(0)
    model = build_model(small_cfg().model).eval()
    crops = torch.rand(3, 3, 64, 64)
    bbox = (10.0, 20.0, 50.0, 90.0)
    matrices = np.tile(crop_matrix(bbox, 64), (3, 1, 1))
    mirrored_matrices = np.tile(crop_matrix(bbox, 64, flip=True), (3, 1, 1))  # crop pixel x -> 63 - x, as .flip(-1)
    perm = PENN.flip_permutation()

    def both(flip_test):
        model.cfg.flip_test = flip_test
        return (predict_crops(model, crops, matrices)[..., :2],
                predict_crops(model, crops.flip(-1), mirrored_matrices)[:, perm, :2])

    plain, plain_mirrored = both(False)
    flipped, flipped_mirrored = both(True)
    np.testing.assert_allclose(flipped, flipped_mirrored, atol=1e-3)
    assert np.abs(plain - plain_mirrored).max() > 0.5
    assert np.abs(flipped - plain).max() > 0.1

def test_separable_keypoint_path_equals_upsampled_maps_through_the_encoder():
    """The reconstruction never builds the keypoint maps: upsampling their x/y factors and splitting the first
    convolution must give what F.interpolate of the maps and the plain convolution give, values and gradients."""
    torch.manual_seed(0)
    encoder = ConvEncoder(30, 8).eval()
    for m in encoder.modules():  # non-trivial BatchNorm statistics, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    coords = torch.rand(4, 30, 2) * 18 - 1  # some keypoints outside the 16x16 map
    plain, split = coords.clone().requires_grad_(True), coords.clone().requires_grad_(True)
    maps = torch.nn.functional.interpolate(gaussian_maps(plain, 16, 1.5), size=64, mode="bilinear",
                                           align_corners=False)
    gx, gy = gaussian_profiles(split, 16, 1.5, 64)
    torch.testing.assert_close(gy[..., :, None] * gx[..., None, :], maps, atol=1e-6, rtol=0)
    expected, got = encoder(maps), encoder.forward_rank1(gx, gy)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    expected.square().sum().backward()
    got.square().sum().backward()
    torch.testing.assert_close(split.grad, plain.grad, atol=1e-6, rtol=1e-4)


def test_pck_hand_computed_with_invisible_joint_and_zero_torso():
    gt = np.zeros((2, 13, 2))
    gt[0, [1, 2], 1] = 0.0  # shoulders at y=0
    gt[0, [7, 8], 1] = 10.0  # hips at y=10 -> torso 10, threshold 2 at alpha .2
    pred = gt.copy()
    pred[0, 0] += [1.5, 0]  # hit
    pred[0, 3] += [3.0, 0]  # miss
    pred[0, 4] += [100, 0]  # miss but invisible below
    vis = np.ones((2, 13))
    vis[0, 4] = 0
    # frame 1: zero torso (all joints at the origin) -> excluded
    res = pck(pred, gt, vis, 0.2, torso_lengths(gt, vis, *PENN.torso))
    assert res["count"] == 12
    assert res["mean"] == pytest.approx(11 / 12)
    assert np.isnan(res["per_joint"][4])


def test_bbc_macc_counts_within_6px_at_half_resolution():
    gt = np.zeros((1, 7, 2))
    pred = gt.copy()
    pred[0, 0] = [12, 0]  # 6 px at half resolution -> hit
    pred[0, 1] = [12.5, 0]  # miss
    assert bbc_macc(pred, gt)["mean"] == pytest.approx(6 / 7)


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    cfg = small_cfg()
    torch.manual_seed(1)
    model = build_model(cfg.model).eval()
    loss = ReconstructionLoss(cfg.loss)
    loss(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64), update_means=True)
    save_checkpoint(str(tmp_path / "ck"), model, cfg, step=7, loss_module=loss)
    ck = load_checkpoint(str(tmp_path / "ck"))
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(model.pose(x)["h_sup"], ck.model.eval().pose(x)["h_sup"])
    assert ck.meta["step"] == 7 and ck.config.model.variant == "transformer"
    assert ck.loss_buffers["running_means"] == loss.running_means.tolist()


def test_checkpoint_refuses_config_weights_mismatch(tmp_path):
    cfg = small_cfg()
    save_checkpoint(str(tmp_path / "ck"), build_model(cfg.model), cfg)
    other = small_cfg("baseline")
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(str(tmp_path / "ck"), overrides=other)


def test_a_truncated_checkpoint_is_one_clear_error_for_every_command(tmp_path):
    """personalize and evaluate print one line; serve refuses before Ray starts (not a traceback or a 50 s wait)."""
    import subprocess
    import sys

    from server.serve import build_app

    cfg = small_cfg()
    save_checkpoint(str(tmp_path / "ck"), build_model(cfg.model), cfg)
    weights = tmp_path / "ck" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt or truncated"):
        load_checkpoint(str(tmp_path / "ck"))
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        build_app({"checkpoint": str(tmp_path / "ck"), "store": str(tmp_path / "store")})
    out = subprocess.run([sys.executable, "-m", "posettp.cli", "evaluate", "--checkpoint", str(tmp_path / "ck"),
                          "--data", str(tmp_path / "nowhere")], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "corrupt or truncated" in out.stderr.strip().splitlines()[-1]


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ConfigError, match="unknown config key: train.max_stepz"):
        load_config("configs/synth_small.yaml", ["train.max_stepz=3"])
    with pytest.raises(ConfigError, match="integer"):
        load_config("configs/synth_small.yaml", ["train.max_steps=abc"])
    assert load_config("configs/synth_small.yaml", ["train.max_steps=30"]).train.max_steps == 30
    with pytest.raises(ConfigError, match="ttp.amp must be one of"):
        load_config("configs/synth_small.yaml", ["ttp.amp=fp8"])
    with pytest.raises(ConfigError, match="data.cross_video is a probability"):
        load_config("configs/synth_small.yaml", ["data.cross_video=1.5"])
    with pytest.raises(ConfigError, match="ttp.cross_video is a probability"):
        load_config("configs/synth_small.yaml", ["ttp.cross_video=-0.1"])
    with pytest.raises(ConfigError, match="ttp.drift_steps must be >= 0"):
        load_config("configs/synth_small.yaml", ["ttp.drift_steps=-1"])


def test_perceptual_vgg16_without_weights_file_is_an_explicit_error():
    cfg = small_cfg()
    cfg.loss.perceptual = "vgg16"
    with pytest.raises(ValueError, match="vgg_weights"):
        ReconstructionLoss(cfg.loss)
    cfg.loss.perceptual = "vgg16_random"
    loss = ReconstructionLoss(cfg.loss)
    assert "random" in loss.mode
    assert loss.running_means.numel() == 1 + 5 + 1  # pixels, five VGG layers, gradient term


def test_motion_focus_weights_errors_where_the_body_moved():
    cfg = small_cfg()
    cfg.loss.motion_focus, cfg.loss.grad_weight = 0.9, 0.0
    loss = ReconstructionLoss(cfg.loss)
    source = torch.full((1, 3, 64, 64), 0.5)
    target = source.clone()
    target[..., 20:30, 20:30] = 0.9  # a limb moved here; the rest of the scene is static
    weights = loss.pixel_weights(target, source)
    assert weights.mean().item() == pytest.approx(1.0, abs=1e-5)
    moved_err, still_err = target.clone(), target.clone()
    moved_err[..., 22:26, 22:26] += 0.1
    still_err[..., 50:54, 50:54] += 0.1
    err_moved = loss.raw_terms(moved_err, target, source)[0]
    err_still = loss.raw_terms(still_err, target, source)[0]
    assert err_moved > 5 * err_still  # an error on the moving body costs far more than one on the background
    assert err_still > 0  # yet the static scene still counts (1 - motion_focus of the mass)


def test_keypoint_warp_keeps_a_still_scene_and_moves_pixels_with_their_keypoint():
    from model.warp import keypoint_warp

    torch.manual_seed(0)
    source = torch.rand(2, 3, 32, 32)
    kp = torch.rand(2, 5, 2) * 31
    torch.testing.assert_close(keypoint_warp(source, kp, kp.clone(), 3.0), source, atol=1e-5, rtol=0)

    blob = torch.zeros(1, 1, 32, 32)
    blob[..., 14:18, 8:12] = 1.0  # centre (9.5, 15.5)
    kp_source = torch.tensor([[[9.5, 15.5], [28.0, 28.0]]])  # one keypoint on the blob, one still elsewhere
    kp_target = torch.tensor([[[15.5, 15.5], [28.0, 28.0]]])  # the first moved 6 px right
    moved = keypoint_warp(blob, kp_source, kp_target, 3.0)[0, 0]
    xs = torch.arange(32.0)
    centre_x = float((moved.sum(0) * xs).sum() / moved.sum())
    assert blob[0, 0, 15, 15] == 0 and moved[15, 15] > 0.9  # the blob now covers the target keypoint
    assert 2.0 < centre_x - 9.5 < 6.0  # and moved right, by less than the keypoint (the field fades)
    assert moved[:, 28:].abs().max() < 1e-6  # nothing moves far from the moving keypoint

    kp_target = kp_target.clone().requires_grad_(True)
    keypoint_warp(blob, kp_source, kp_target, 3.0).sum().backward()
    assert kp_target.grad[0, 0].abs().sum() > 0  # the target's keypoint position steers the reconstruction


def test_warped_skip_makes_the_reconstruction_depend_on_the_target_keypoints():
    """With the keypoint encoder silenced, only the warped skip can carry the target's keypoints into the image."""
    cfg = small_cfg("transformer")
    target, source = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    grads = {}
    for warp_sigma in (0.0, 1.5):
        cfg.model.warp_sigma = warp_sigma
        torch.manual_seed(0)
        model = build_model(cfg.model).eval()
        with torch.no_grad():
            for p in model.kp_encoder.parameters():
                p.zero_()
        h_self = model.self_logits(target).detach().requires_grad_(True)
        model.reconstruct(h_self, source)["recon"].square().sum().backward()
        grads[warp_sigma] = h_self.grad.abs().sum().item()
    assert grads[0.0] == 0 and grads[1.5] > 0
    with pytest.raises(ConfigError, match="render_skip"):
        load_config("configs/synth_small.yaml", ["model.render_skip=false", "model.warp_sigma=1.5"])


class _HeatmapsAreTheImage:
    """A stand-in pose model whose supervised heatmaps are its input: it moves every map with the image, so it
    agrees with its mirror exactly where each joint's map equals its mirror joint's."""

    def pose(self, images):
        return {"h_sup": images}


def test_flip_consistency_is_zero_exactly_when_the_mirror_agrees_and_pulls_each_map_toward_its_mirror():
    perm = np.array([0, 2, 1])  # joint 0 central, 1 and 2 a left/right pair
    maps = torch.rand(2, 3, 16, 16)
    maps[:, 2] = maps[:, 1]
    model = _HeatmapsAreTheImage()
    assert flip_consistency(maps, mirrored_heatmaps(model, maps, perm)).item() == 0.0
    shifted = maps.clone()
    shifted[:, 1] = maps[:, 1].roll(1, dims=-1)  # one side's joint a pixel off sideways: the mirror disagrees
    h = shifted.clone().requires_grad_(True)
    loss = flip_consistency(h, mirrored_heatmaps(model, shifted, perm))
    assert loss.item() > 1e-3
    loss.backward()
    # each map is pulled toward its mirror's: the gradient of half their mean squared difference; the central joint
    # (its own mirror here) feels no pull
    assert torch.allclose(h.grad, (shifted - shifted[:, perm]) / shifted.numel(), atol=1e-9)
    assert h.grad[:, 0].abs().max() == 0 and h.grad[:, 1].abs().max() > 0


def test_mirror_pseudo_labels_pull_both_views_toward_their_average_and_flatter_maps_cannot_satisfy_them():
    with pytest.raises(ConfigError, match="model.num_joints is 5 but the penn joint set has 13 joints"):
        load_config("configs/synth_small.yaml", ["ttp.pseudo_label_weight=100", "model.num_joints=5"])
    with pytest.raises(ConfigError, match="ttp.pseudo_label_weight must be >= 0"):
        load_config("configs/synth_small.yaml", ["ttp.pseudo_label_weight=-1"])
    perm = np.array([0, 2, 1])  # joint 0 central, 1 and 2 a left/right pair
    # the stand-in's mirror swaps the pair's maps: sharp maps agree with it where the pair's coincide
    coords = torch.tensor([[[7.5, 5.0], [4.0, 8.0], [4.0, 8.0]]])
    maps = gaussian_maps(coords, 16, 2.0)
    model = _HeatmapsAreTheImage()
    assert mirror_pseudo_labels(maps, mirrored_heatmaps(model, maps, perm), 2.0, decode_dark).item() < 1e-6
    # flatter maps (half as high) agree with the mirror as well as before, yet miss the sharp target
    flat = 0.5 * maps
    assert flip_consistency(flat, mirrored_heatmaps(model, flat, perm)).item() == 0.0
    assert mirror_pseudo_labels(flat, mirrored_heatmaps(model, flat, perm), 2.0, decode_dark).item() > 1e-2

    shifted = gaussian_maps(torch.tensor([[[7.5, 5.0], [5.0, 8.0], [4.0, 8.0]]]), 16, 2.0)  # joint 1 a pixel right
    h = shifted.clone().requires_grad_(True)
    mirrored = mirrored_heatmaps(model, shifted, perm).clone().requires_grad_(True)
    loss = mirror_pseudo_labels(h, mirrored, 2.0, decode_dark)
    loss.backward()
    # both views are pulled toward one target, half-way between where they put the joint (x 5 and 4)...
    goal = gaussian_maps(decode_dark(0.5 * (shifted + mirrored.detach()))[0], 16, 2.0)
    assert decode_dark(goal)[0][0, 1, 0].item() == pytest.approx(4.5, abs=0.1)
    # ... which carries no gradient: each view's gradient is its own distance to it, and the agreeing joints feel none
    assert torch.allclose(h.grad * h.numel(), h.detach() - goal, atol=1e-6)
    assert torch.allclose(mirrored.grad * h.numel(), mirrored.detach() - goal, atol=1e-6)
    assert h.grad[:, 0].abs().max() < 1e-9 and h.grad[:, 1].abs().max() * h.numel() > 0.1
    # with an agreement radius below the views' 1-pixel disagreement, joint 1 gets no pseudo-label; above it, it does
    for agreement, pulled in ((0.5, False), (1.5, True)):
        h.grad = None
        mirror_pseudo_labels(h, mirrored, 2.0, decode_dark, agreement).backward()
        assert (h.grad[:, 1].abs().max().item() > 1e-6) == pulled
    with pytest.raises(ConfigError, match="ttp.pseudo_label_agreement must be >= 0"):
        load_config("configs/synth_small.yaml", ["ttp.pseudo_label_weight=300", "ttp.pseudo_label_agreement=-1"])
    with pytest.raises(ConfigError, match="ttp.pseudo_label_agreement gates the pseudo-labels"):
        load_config("configs/synth_small.yaml", ["ttp.pseudo_label_agreement=0.5"])


def test_each_joint_set_mirrors_with_its_own_pairs():
    assert PENN.flip_permutation()[5] == 6 and BBC.flip_permutation()[1] == 2 and H36M.flip_permutation()[1] == 4
    assert H36M.flip_permutation()[9] == 9  # the nose stays
    # Human3.6M and COCO both have 17 joints: the count alone cannot say which joints swap
    assert COCO.flip_permutation()[1] == 2 and COCO.flip_permutation()[0] == 0
    assert list(H36M.flip_permutation()) != list(COCO.flip_permutation())
    for js in (PENN, BBC, H36M, COCO):  # every pair swaps a left_X with its right_X (BBC's names say so too)
        assert all({js.joints[a][:5], js.joints[b][:5]} == {"left_", "right"} for a, b in js.flip_pairs), js.name
        assert JointSet.from_dict(js.to_dict()) == js
    with pytest.raises(ValueError, match="unknown joint set 'mpii'"):
        joint_set("mpii")
    with pytest.raises(ValueError, match="outside its 13 joints"):
        JointSet.from_dict({**PENN.to_dict(), "skeleton": [[0, 13]]})
