"""Synthetic persons: determinism, labels inside frames, static scenes, the shift, speed, and `posettp synth`."""
import argparse
import time

import cv2
import numpy as np
import pytest

from data.shards import SCHEMA, list_persons, load_frames, read_manifest, read_table
from data.synth import DEFAULT_STRENGTH, SynthConfig, main, make_person, person_frames, person_id, split_plan
from data.synth.look import SHIFT_HAIR, SHIFT_SCENES, SHIFT_TEXTURES, TRAIN_SCENES, TRAIN_TEXTURES, Shift
from model.joints import PENN_JOINTS

CFG = SynthConfig(size=64, frames=12, videos=2, extra_frames=10, seed=7)


def test_same_seed_same_frames_other_seed_other_frames():
    a = list(person_frames(CFG, "train", 3))
    b = list(person_frames(CFG, "train", 3))
    c = list(person_frames(SynthConfig(size=64, frames=12, videos=2, seed=8), "train", 3))
    assert len(a) == 24 and all(np.array_equal(x.image, y.image) and np.array_equal(x.keypoints, y.keypoints)
                                for x, y in zip(a, b))
    assert not np.array_equal(a[0].image, c[0].image)


def test_joints_lie_in_the_frame_and_boxes_hold_them():
    n_vis = n = 0
    for split in ("train", "test"):
        for i in range(4):
            for f in person_frames(CFG, split, i):
                if f.video_id.startswith("extra-"):
                    assert not f.keypoints.any()
                    continue
                vis = f.keypoints[:, 2] > 0
                xy = f.keypoints[vis, :2]
                assert ((xy >= 0) & (xy <= 63)).all()
                x, y, w, h = f.bbox
                assert (xy[:, 0] >= x - 1e-3).all() and (xy[:, 0] <= x + w + 1e-3).all()
                assert (xy[:, 1] >= y - 1e-3).all() and (xy[:, 1] <= y + h + 1e-3).all()
                n_vis, n = n_vis + vis.sum(), n + 13
    assert n_vis / n > 0.85  # most joints are visible; occluders and frame edges hide a few


def test_background_is_static_within_a_video():
    checked = 0
    for i in range(3):
        frames = list(person_frames(CFG, "train", i))
        for video in ("v0", "v1"):
            clip = [f for f in frames if f.video_id == video]
            far = np.ones((64, 64), bool)
            for f in clip:  # mask out everything near the person (all joints, hidden ones too) in any frame
                (x0, y0), (x1, y1) = f.keypoints[:, :2].min(axis=0), f.keypoints[:, :2].max(axis=0)
                pad = 0.15 * max(x1 - x0, y1 - y0) + 3  # limb widths, hair, feet, shadow and blur reach past joints
                far[max(int(y0 - pad), 0):int(y1 + pad) + 1, max(int(x0 - pad), 0):int(x1 + pad) + 1] = False
            for f in clip[1:]:
                assert np.array_equal(f.image[far], clip[0].image[far]), (i, video, f.frame)
            assert not np.array_equal(clip[0].image, clip[-1].image)  # the person moves
            checked += far.sum()
    assert checked > 3000


@pytest.mark.parametrize("split", ["test", "val"])
def test_test_and_validation_persons_come_from_the_shifted_distribution(split):
    """Settings are chosen on validation persons: they must meet the test persons' shift, not the training look."""
    full = SynthConfig(size=64, frames=4, shift=Shift.from_strength(1.0))
    none = SynthConfig(size=64, frames=4, shift=Shift.from_strength(0.0))
    train = [make_person(full, "train", i) for i in range(12)]
    test = [make_person(full, split, i) for i in range(12)]
    assert all(p.scene_family in TRAIN_SCENES for p in train) and all(p.scene_family in SHIFT_SCENES for p in test)
    assert all(p.look.shirt.family in TRAIN_TEXTURES and p.look.pants.family in TRAIN_TEXTURES for p in train)
    assert all(p.look.shirt.family in SHIFT_TEXTURES and p.look.pants.family in SHIFT_TEXTURES for p in test)
    assert not any(p.look.hair in SHIFT_HAIR for p in train)
    # with shift 0 test persons are drawn like training persons (same seeds -> different persons though)
    assert all(make_person(none, "test", i).scene_family in TRAIN_SCENES for i in range(12))
    # and their images differ in colour statistics: shifted palettes are more saturated
    sat = lambda ps: np.mean([cv2.cvtColor(p.scene, cv2.COLOR_RGB2HSV)[..., 1].mean() for p in ps])  # noqa: E731
    assert sat(test) > sat(train) + 20


def test_shift_changes_appearance_only():
    """Same test person at two clothing/background shifts: same motion, camera and labels, other pixels."""
    plain = SynthConfig(size=64, frames=6, videos=2, extra_frames=0, shift=Shift())
    shifted = SynthConfig(size=64, frames=6, videos=2, extra_frames=0, shift=Shift(clothing=1.0, background=1.0))
    a, b = list(person_frames(plain, "test", 2)), list(person_frames(shifted, "test", 2))
    assert all(np.array_equal(x.keypoints, y.keypoints) and np.array_equal(x.bbox, y.bbox) for x, y in zip(a, b))
    assert np.abs(a[0].image.astype(int) - b[0].image.astype(int)).mean() > 20


def test_shift_components_choose_what_shifts():
    assert Shift.profile_of("clothing, background") == Shift(clothing=1.0, body=0.0, background=1.0)
    for bad in ("hat", ""):
        with pytest.raises(ValueError, match="shift components"):
            Shift.profile_of(bad)
    plain = SynthConfig(size=64, frames=6, videos=1, extra_frames=0, shift=Shift())
    scene_only = SynthConfig(size=64, frames=6, videos=1, extra_frames=0,
                             shift=Shift.from_strength(1.0, Shift.profile_of("background")))
    a, b = list(person_frames(plain, "test", 2)), list(person_frames(scene_only, "test", 2))
    assert all(np.array_equal(x.keypoints, y.keypoints) for x, y in zip(a, b))  # the body is not shifted
    assert np.abs(a[0].image.astype(int) - b[0].image.astype(int)).mean() > 20


def test_split_plan_rule():
    plan = split_plan(100)
    counts = {s: sum(1 for p in plan if p[0] == s) for s in ("train", "val", "test")}
    assert counts == {"train": 60, "val": 10, "test": 30}
    assert {s for s, _ in split_plan(3)} == {"train", "val", "test"}
    assert split_plan(5, "test") == [("test", i) for i in range(5)]
    with pytest.raises(ValueError):
        split_plan(0)


def test_render_speed_sanity():
    cfg = SynthConfig(size=64, frames=40, videos=2, extra_frames=0)
    list(person_frames(cfg, "train", 0))  # warm up
    t0 = time.perf_counter()
    n = sum(1 for _ in person_frames(cfg, "train", 1))
    fps = n / (time.perf_counter() - t0)
    assert fps > 100, f"{fps:.0f} frames/s at 64x64 (target >= 200 on one idle core)"


def test_cli_writes_shards_manifest_and_contact_sheet(tmp_path):
    out = str(tmp_path / "synth")
    args = argparse.Namespace(out=out, persons=4, frames=6, size=64, seed=1, shift=None,
                              shift_components="clothing,body,background", split="all", videos=2, extra_frames=8)
    assert main(args) == 0
    m = read_manifest(out)
    assert m["dataset"] == "synth" and m["joints"] == list(PENN_JOINTS) and m["generator"]["shift"] == DEFAULT_STRENGTH
    assert m["generator"]["calibration"]["pck@0.2_without_ttp"]
    assert m["generator"]["shift_profile"] == {"clothing": 1.0, "body": 1.0, "background": 1.0}
    assert {s: c["persons"] for s, c in m["splits"].items()} == {"train": 2, "val": 1, "test": 1}
    assert m["splits"]["test"] == {"persons": 1, "frames": 20, "labeled_frames": 12}
    assert read_table(out).schema.equals(SCHEMA)
    assert list_persons(out, "test") == [person_id(1, "test", 0)]
    assert m["splits"]["val"] == {"persons": 1, "frames": 20, "labeled_frames": 12}  # extra frames, as test's
    frames = load_frames(out, split="val")
    assert len(frames) == 20 and frames[0].image.shape == (64, 64, 3)
    sheet = cv2.imread(str(tmp_path / "synth" / "contact_sheet.png"))
    assert sheet is not None and sheet.shape[0] >= 3 * 128
