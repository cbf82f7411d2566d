"""`posettp export`: the exported pose path (TorchScript, ONNX) computes what `model.predict.predict_crops` does.

The reference is `predict_crops` itself with identity crop affines (its output is then in crop pixels, where the
exported files stay). TorchScript runs the same kernels as eager PyTorch and must agree within 1e-4 px; ONNX Runtime
rounds differently, and DARK's Newton step from the argmax magnifies that: measured on 512 random crops per
configuration (onnxruntime 1.32, CPU), at most 8.2e-4 px for the fixture checkpoints, 2.0e-3 px for the personalized
one (1.4e-3 px over another 4096 crops), and 3.4e-7 in score; quarter decoding: 0 px. Hence 5e-3 px and 1e-5.
"""
from __future__ import annotations

import argparse
import importlib.util
import warnings

import numpy as np
import pytest
import torch

from client.export import main as export_main
from model.checkpoint import load_checkpoint
from model.delta import DeltaRejected, apply_delta
from model.export import PosePath, export_onnx, export_torchscript, pose_path
from model.predict import predict_crops
from store.policy import DeltaPolicy
from tests.fixtures_flower import make_checkpoint
from tests.fixtures_serve import make_delta

TS_TOL_PX = 1e-4
ONNX_TOL_PX = 5e-3
ONNX_TOL_SCORE = 1e-5
N_CROPS = 12  # not the tracing example's batch of 2; batch 1 is checked too

# (model overrides, seed): the shipped synth_small path (transformer, DARK), quarter decoding with flip test,
# and the 1x1 supervised head of the baseline (flip test, DARK)
CONFIGS = {
    "transformer-dark": ([], 0),
    "transformer-quarter-flip": (["model.decode=quarter", "model.flip_test=true"], 1),
    "baseline-dark-flip": (["model.variant=baseline", "model.flip_test=true"], 2),
}


def load_torchscript(path):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=DeprecationWarning)
        return torch.jit.load(str(path))


def onnxruntime_session(path):
    ort = pytest.importorskip("onnxruntime")  # a test dependency: installed with posettp[test]
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def reference(model, crops: torch.Tensor) -> np.ndarray:
    """`predict_crops` with identity affines: keypoints in crop pixels."""
    eye = np.tile(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), (len(crops), 1, 1))
    return predict_crops(model, crops, eye)


def random_crops(n: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))  # [0, 1], as prepare_crop


def assert_close(got: np.ndarray, want: np.ndarray, tol_px: float, tol_score: float) -> tuple[float, float]:
    assert got.shape == want.shape and got.dtype == np.float32
    px, score = float(np.abs(got[..., :2] - want[..., :2]).max()), float(np.abs(got[..., 2] - want[..., 2]).max())
    assert px <= tol_px and score <= tol_score, f"max |dxy| {px:.3g} px, max |dscore| {score:.3g}"
    return px, score


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    overrides, seed = CONFIGS[request.param]
    url = str(tmp_path_factory.mktemp("export") / f"ck-{request.param}")
    make_checkpoint(url, overrides=overrides, seed=seed)
    return url


@pytest.fixture(scope="module")
def open_checkpoint(tmp_path_factory):
    """The shipped config without a trust region (drift_steps=0), so that a visible test delta passes the policy."""
    url = str(tmp_path_factory.mktemp("export") / "ck-open")
    make_checkpoint(url, overrides=["ttp.drift_steps=0"], seed=3)
    return url


def test_pose_path_is_predict_crops_in_crop_pixels(checkpoint):
    model = load_checkpoint(checkpoint).model.eval()
    crops = random_crops(N_CROPS, model.cfg.image_size)
    with torch.no_grad():
        got = pose_path(model)(crops).numpy()
    assert got.shape == (N_CROPS, model.cfg.num_joints, 3)
    np.testing.assert_array_equal(got, reference(model, crops))


def test_torchscript_matches_predict(checkpoint, tmp_path):
    model = load_checkpoint(checkpoint).model.eval()
    size = model.cfg.image_size
    export_torchscript(model, size, tmp_path / "pose.pt")
    loaded = load_torchscript(tmp_path / "pose.pt")
    for n in (N_CROPS, 1):
        crops = random_crops(n, size, seed=n)
        with torch.no_grad():
            assert_close(loaded(crops).numpy(), reference(model, crops), TS_TOL_PX, 1e-6)
    # only the inference path travels: no reconstruction branch in the file
    names = [k for k, _ in loaded.named_parameters()] + [k for k, _ in loaded.named_buffers()]
    assert names and not any(k.startswith(("renderer", "appearance", "kp_encoder", "rotation_head")) for k in names)


def test_onnx_matches_predict(checkpoint, tmp_path):
    pytest.importorskip("onnx")
    model = load_checkpoint(checkpoint).model.eval()
    size = model.cfg.image_size
    export_onnx(model, size, tmp_path / "pose.onnx")
    session = onnxruntime_session(tmp_path / "pose.onnx")
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name) == ("crops", "keypoints")
    assert inp.shape[1:] == [3, size, size] and not isinstance(inp.shape[0], int)  # dynamic batch
    for n in (N_CROPS, 1):
        crops = random_crops(n, size, seed=n)
        got = session.run(None, {"crops": crops.numpy()})[0]
        assert_close(got, reference(model, crops), ONNX_TOL_PX, ONNX_TOL_SCORE)


def export_args(ck, out, fmt, delta=None):
    return argparse.Namespace(checkpoint=ck, delta=delta, format=fmt, out=str(out))


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_cli_export_with_delta_is_the_personalized_model(open_checkpoint, tmp_path, capsys, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnx")
    ck = load_checkpoint(open_checkpoint)
    delta_file = tmp_path / "alice.delta"
    delta_file.write_bytes(make_delta(ck.model, ck.sha256, "alice", seed=5, scale=0.15, dtype="fp16"))
    out = tmp_path / ("alice.onnx" if fmt == "onnx" else "alice.pt")
    assert export_main(export_args(open_checkpoint, out, fmt, str(delta_file))) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and fmt in line and str(out) in line and f"{out.stat().st_size:,} bytes" in line
    assert "N x 3 x 64 x 64" in line

    personal = type(ck.model)(ck.model.cfg)  # the person's model as `posettp evaluate --store` builds it
    delta, _ = DeltaPolicy.for_checkpoint(ck).check(delta_file.read_bytes())
    personal.load_state_dict(apply_delta(ck.model.state_dict(), delta))
    personal.eval()
    crops = random_crops(N_CROPS, 64)
    want, base = reference(personal, crops), reference(ck.model.eval(), crops)
    assert np.abs(want[..., :2] - base[..., :2]).max() > 0.5  # the delta visibly moves keypoints

    if fmt == "torchscript":
        with torch.no_grad():
            got = load_torchscript(out)(crops).numpy()
        assert_close(got, want, TS_TOL_PX, 1e-6)
    else:
        got = onnxruntime_session(out).run(None, {"crops": crops.numpy()})[0]
        assert_close(got, want, ONNX_TOL_PX, ONNX_TOL_SCORE)


def test_cli_refuses_a_delta_the_policy_refuses(tmp_path):
    url = str(tmp_path / "ck")
    make_checkpoint(url, seed=4)  # shipped trust region: no weight may move more than ttp.drift_steps * ttp.lr
    ck = load_checkpoint(url)
    bad = {"outside the trust region": make_delta(ck.model, ck.sha256, "bob", seed=6, scale=0.15),
           "made for another base": make_delta(ck.model, "0" * 64, "bob", seed=6, scale=1e-6)}
    for why, data in bad.items():
        (tmp_path / "bob.delta").write_bytes(data)
        with pytest.raises(DeltaRejected):  # a ValueError: `posettp export` prints it and exits 2
            export_main(export_args(url, tmp_path / "bob.pt", "torchscript", str(tmp_path / "bob.delta")))
        assert not (tmp_path / "bob.pt").exists(), why


def test_cli_onnx_without_onnx_says_what_to_install(open_checkpoint, tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "onnx" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert export_main(export_args(open_checkpoint, tmp_path / "x.onnx", "onnx")) == 2
    assert "pip install 'posettp[export]'" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_pose_path_holds_only_the_inference_modules(open_checkpoint):
    model = load_checkpoint(open_checkpoint).model
    path = pose_path(model)
    assert isinstance(path, PosePath) and not path.training
    assert {name for name, _ in path.named_children()} == {"encoder", "self_head", "sup_head"}
    assert path.encoder is model.encoder  # shared, not copied: a delta applied to the model is what gets exported


def test_export_refuses_another_crop_size(open_checkpoint, tmp_path):
    model = load_checkpoint(open_checkpoint).model
    with pytest.raises(ValueError, match="crop size 64"):
        export_torchscript(model, 96, tmp_path / "pose.pt")
