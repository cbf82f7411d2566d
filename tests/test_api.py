"""The Python API (`posettp.load`): predictions are the HTTP API's keypoints from `predict_crops`, a personalization
is run_ttp's delta, and `with_delta` applies it under the store's delta policy."""
import json
import re
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import posettp
from core.crops import prepare_crop
from data.shards import load_frames
from model.checkpoint import load_checkpoint
from model.delta import DeltaRejected, apply_delta, read_metadata
from model.predict import predict_crops
from model.joints import PENN_JOINTS
from model.transforms import full_image_bbox
from store.policy import DeltaPolicy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root, also under plain `pytest`
from tests.fixtures_flower import make_checkpoint, write_random_shards  # noqa: E402

TINY = {"steps": 4, "batch_size": 4, "guard": False, "min_pose_signal": 0}  # fixtures_flower.TINY_OVERRIDES

# The README's example, run as written but for the paths and the tiny TTP settings
README_EXAMPLE = re.search(r"```python\n(import glob, posettp\n.*?)```",
                           (Path(__file__).resolve().parents[1] / "README.md").read_text(), re.S).group(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny checkpoint inside a training run directory, one person's frames, and the base model."""
    root = tmp_path_factory.mktemp("api")
    ck_url = str(root / "run" / "checkpoint_0000001")
    make_checkpoint(ck_url)
    # training's latest.json; "best" names a checkpoint that does not exist: load must take "checkpoint"
    (root / "run" / "latest.json").write_text(json.dumps(
        {"checkpoint": ck_url, "step": 1, "metrics": {}, "best": {"checkpoint": str(root / "missing"), "step": 1}}))
    write_random_shards(str(root / "shards"), persons=1, frames=8, size=64)
    frames = load_frames(str(root / "shards"), person="p000")
    return {"root": root, "ck_url": ck_url, "frames": frames, "model": posettp.load(ck_url)}


@pytest.fixture(scope="module")
def personalized(world):
    delta = world["model"].personalize(world["frames"], scenario="offline", person_id="p000", dtype="fp32", **TINY)
    path = world["root"] / "p000.safetensors"
    delta.save(path)
    return delta, path


def reference(ck_url: str, images, boxes, delta_bytes: bytes | None = None) -> np.ndarray:
    """(N, J, 3) by hand: crops by `prepare_crop`, the checkpoint's model (+ `apply_delta`), `predict_crops`."""
    ck = load_checkpoint(ck_url)
    if delta_bytes is not None:
        tensors, _ = DeltaPolicy.for_checkpoint(ck).check(delta_bytes)
        ck.model.load_state_dict(apply_delta(ck.model.state_dict(), tensors))
    crops, mats = zip(*(prepare_crop(im, box, ck.config.model.image_size) for im, box in zip(images, boxes)))
    return predict_crops(ck.model.eval(), torch.from_numpy(np.stack(crops)), np.stack(mats))


def as_array(poses) -> np.ndarray:
    return np.array([[[k["x"], k["y"], k["score"]] for k in pose] for pose in poses])


def test_predict_is_predict_crops_with_named_joints(world, tmp_path):
    wide = np.random.default_rng(1).integers(0, 255, (80, 96, 3), dtype=np.uint8)
    path = tmp_path / "wide.png"
    cv2.imwrite(str(path), cv2.cvtColor(wide, cv2.COLOR_RGB2BGR))  # lossless: the file is the array
    square = world["frames"][0].image
    box = (20.0, 10.0, 40.0, 50.0)  # its padded crop lies inside the 96x80 image
    poses = world["model"].predict([square, wide, str(path)], boxes=[None, box, box])

    assert len(poses) == 3 and all(len(p) == 13 for p in poses)
    assert all([k["name"] for k in p] == list(PENN_JOINTS) for p in poses)
    got = as_array(poses)
    want = reference(world["ck_url"], [square, wide, wide], [full_image_bbox(64, 64), box, box])
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_array_equal(got[1], got[2])  # a path reads as its pixels
    for pose, (w, h) in zip(got, [(64, 64), (96, 80), (96, 80)]):
        assert ((pose[:, 0] >= 0) & (pose[:, 0] < w) & (pose[:, 1] >= 0) & (pose[:, 1] < h)).all()
    with pytest.raises(ValueError, match="2 boxes for 3 images"):
        world["model"].predict([square, wide, wide], boxes=[None, box])


def test_load_follows_a_run_directorys_latest_json(world):
    model = posettp.load(world["root"] / "run", device="auto")
    assert model.checkpoint.sha256 == world["model"].checkpoint.sha256 and model.device.type in ("cpu", "cuda")


def test_personalize_then_with_delta_is_base_plus_apply_delta(world, personalized):
    delta, path = personalized
    assert (delta.scenario, delta.frames, delta.steps, delta.guard_events) == ("offline", 16, 4, 0)
    assert not delta.kept_base and delta.reason == ""
    assert np.isfinite([delta.loss_before, delta.loss_after]).all()
    assert path.read_bytes() == delta.data and delta.size_bytes == path.stat().st_size

    me = world["model"].with_delta(path)
    assert me.delta_meta["person_id"] == "p000" and me.delta_meta["base_sha256"] == world["model"].checkpoint.sha256
    images = [f.image for f in world["frames"][:4]]
    base, mine = as_array(world["model"].predict(images)), as_array(me.predict(images))
    assert np.abs(base[..., :2] - mine[..., :2]).max() > 0.01  # personalized: the poses moved
    boxes = [full_image_bbox(64, 64)] * len(images)
    np.testing.assert_allclose(mine, reference(world["ck_url"], images, boxes, delta.data), atol=1e-4)
    np.testing.assert_allclose(base, reference(world["ck_url"], images, boxes), atol=1e-4)  # the base is untouched


def test_personalize_says_why_it_kept_the_base(world):
    delta = world["model"].personalize(world["frames"][:8], min_pose_signal=1e6)
    assert delta.kept_base and delta.steps == 0 and delta.guard_events == 1
    assert "pose-signal check after 0 updates" in delta.reason and "ttp.min_pose_signal 1e+06" in delta.reason
    with pytest.raises(ValueError, match="no delta to save: pose-signal check"):
        delta.save(world["root"] / "never.safetensors")


def retampered(data: bytes, **meta) -> bytes:
    """The delta with its first tensor's first value NaN (`nan=True`) or its metadata changed."""
    tensors, header = st_load(data), dict(read_metadata(data))
    if meta.pop("nan", False):
        first = sorted(tensors)[0]
        tensors[first].view(-1)[0] = float("nan")
    return st_save(tensors, metadata={**header, **meta})


@pytest.mark.parametrize("tamper, reason", [
    (lambda d: retampered(d, nan=True), "holds NaN or Inf"),
    (lambda d: retampered(d, base_sha256="0" * 64), "delta was made for base 000000000000"),
    (lambda d: d[:len(d) // 2], "not a safetensors file|unreadable delta"),
])
def test_with_delta_refuses_a_tampered_delta(world, personalized, tmp_path, tamper, reason):
    path = tmp_path / "tampered.safetensors"
    path.write_bytes(tamper(personalized[0].data))
    with pytest.raises(DeltaRejected, match=reason):
        world["model"].with_delta(path)


def test_readme_example_runs(world, tmp_path):
    folder = tmp_path / "me"
    folder.mkdir()
    for i, f in enumerate(world["frames"]):
        cv2.imwrite(str(folder / f"{i:03d}.png"), cv2.cvtColor(f.image, cv2.COLOR_RGB2BGR))
    tiny = ", ".join(f"{k}={v!r}" for k, v in TINY.items())
    code = (README_EXAMPLE.replace('"runs/demo"', repr(str(world["root"] / "run")))
            .replace('"frame.jpg"', repr(str(folder / "000.png")))
            .replace('"me/*.jpg"', repr(str(folder / "*.png")))
            .replace('"me.safetensors"', repr(str(tmp_path / "me.safetensors")))
            .replace("steps=30", tiny))
    assert not any(p in code for p in ('"runs/demo"', '"frame.jpg"', '"me/*.jpg"', '"me.safetensors"', "=30"))
    ns: dict = {}
    exec(compile(code, "README example", "exec"), ns)  # noqa: S102 - the test's own constant
    assert ns["delta"].steps == 4 and ns["delta"].frames == 16 and (tmp_path / "me.safetensors").is_file()
    assert ns["me"].delta_meta["dtype"] == "int8"
    assert as_array(ns["me"].predict([folder / "000.png"])).shape == (1, 13, 3)
