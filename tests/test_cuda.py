"""The GPU paths: training, prediction and TTP on CUDA behave as on the CPU.

CI has no GPU, so the CUDA tests skip there; they run wherever torch sees one
(`scripts/gpu_check.sh` ran them on an H100: `docs/gpu/`). The device choice itself is
tested everywhere.
"""
import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_personalize import setup  # noqa: F401  (the module fixture: a calibrated toy model and 12 crops)

from model.delta import apply_delta, deltable_keys, extract_delta
from model.device import pick_device
from model.network import build_model
from model.personalize import adaptable_parameters, personalize
from model.predict import predict_crops

REPO = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_device_choice():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(None) == pick_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device must be one of"):
        pick_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            pick_device("cuda")


def on_cuda(model):
    clone = build_model(model.cfg)
    clone.load_state_dict(model.state_dict())
    return clone.eval().cuda()


@pytest.fixture
def fp32_cuda():
    """cuDNN convolutions in full fp32 (TF32 is on by default): the CPU comparison is then to float rounding."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


@needs_cuda
def test_cuda_predictions_equal_the_cpu_ones(setup, fp32_cuda):  # noqa: F811
    _, model, _, crops, matrices, _ = setup
    gpu = on_cuda(model)
    with torch.no_grad():
        h_cpu, h_gpu = model.pose(crops)["h_sup"], gpu.pose(crops.cuda())["h_sup"].cpu()
    torch.testing.assert_close(h_gpu, h_cpu, rtol=1e-4, atol=1e-4 * float(h_cpu.abs().max()))
    cpu_xy, gpu_xy = predict_crops(model, crops, matrices), predict_crops(gpu, crops.cuda(), matrices)
    assert np.median(np.abs(gpu_xy - cpu_xy)) < 1e-3


@needs_cuda
@pytest.mark.parametrize("scenario", ["offline", "online"])
def test_ttp_on_cuda_adapts_only_what_it_may_and_its_delta_reproduces_it(setup, scenario, fp32_cuda):  # noqa: F811
    """base + delta on the GPU predicts what TTP on the GPU predicted, with TF32 off: under TF32 the delta's fp32
    rounding (base + (adapted - base)) can flip a weight's TF32 rounding, which moved joints by up to 5e-3 px."""
    cfg, model, recon, crops, matrices, groups = setup
    gpu = on_cuda(model)
    before = {k: v.clone() for k, v in gpu.state_dict().items()}
    result = personalize(gpu, copy.deepcopy(recon).cuda(), crops.cuda(), matrices, groups, cfg.ttp, scenario, seed=0)
    assert all(torch.equal(before[k], v) for k, v in gpu.state_dict().items()), "base model was modified"
    assert result.metrics["steps"] > 0 and np.isfinite(result.metrics["loss_after"])
    assert np.all(np.isfinite(result.predictions))
    changed = {k for k, v in result.state.items() if not torch.equal(before[k], v)}
    assert changed and changed <= {n for n, _ in adaptable_parameters(gpu, cfg.ttp.adapt)}
    if scenario == "offline":  # (online, each frame is predicted by a different intermediate model)
        base = {k: v.cpu() for k, v in before.items()}
        delta = extract_delta(base, {k: v.cpu() for k, v in result.state.items()},
                              deltable_keys(base, {n for n, _ in model.named_parameters()}))
        restored = on_cuda(model)
        restored.load_state_dict(apply_delta(restored.state_dict(), delta))
        np.testing.assert_allclose(predict_crops(restored, crops.cuda(), matrices), result.predictions, atol=1e-3)


@needs_cuda
def test_online_ttp_on_cuda_never_looks_at_future_frames(setup):  # noqa: F811
    """As on the CPU, up to the GPU's non-deterministic backward (atomic adds): far below a pixel."""
    cfg, model, recon, crops, matrices, groups = setup
    gpu, gpu_recon = on_cuda(model), copy.deepcopy(recon).cuda()
    future_changed = crops.clone()
    future_changed[8:] = torch.rand(4, 3, 64, 64)
    a = personalize(gpu, gpu_recon, crops.cuda(), matrices, groups, cfg.ttp, "online", seed=3)
    b = personalize(gpu, gpu_recon, future_changed.cuda(), matrices, groups, cfg.ttp, "online", seed=3)
    np.testing.assert_allclose(a.predictions[:8], b.predictions[:8], atol=1e-2)
    assert np.abs(a.predictions[8:] - b.predictions[8:]).max() > 1e-2  # the changed frames do count


@needs_cuda
def test_reproduce_trains_and_evaluates_on_the_gpu(tmp_path):
    """`posettp reproduce` (train_local + evaluate_person) on CUDA by default: models and evaluations say so."""
    def posettp(*args):
        proc = subprocess.run([sys.executable, "-m", "posettp.cli", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    data, out = tmp_path / "data", tmp_path / "out"
    posettp("synth", "--out", str(data), "--persons", "6", "--frames", "6", "--size", "64")
    sets = [a for kv in ["train.max_steps=20", "train.batch_size=4", "ttp.steps=2", "ttp.batch_size=2",
                         "ttp.min_pose_signal=0", f"data.url={data}"] for a in ("--set", kv)]
    posettp("reproduce", "table1", "--config", "configs/synth_small.yaml", *sets, "--seeds", "1", "--jobs", "1",
            "--variants", "baseline,transformer", "--out", str(out))
    meta = json.loads((out / "models" / "transformer-s0" / "config.json").read_text())
    assert meta["metrics"]["device"] == "cuda"
    assert all(np.isfinite(h["l_sup"]) and np.isfinite(h["l_self"]) for h in meta["metrics"]["history"])
    evaluation = json.loads(next((out / "evals").glob("transformer-s0-offline*.json")).read_text())
    assert evaluation["device"] == "cuda" and len(evaluation["persons"]) == 2
