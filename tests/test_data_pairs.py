"""Training pairs: one shared augmentation for target and source, joint coordinates, visibility and flips."""
import numpy as np
import pytest
import torch

from core.crops import prepare_frame, prepare_frames
from data.pairs import PairDataset, person_set, person_stream
from data.shards import Frame
from model.config import DataConfig
from model.joints import PENN
from model.transforms import apply_affine, crop_matrix, to_tensor_layout, warp

SIZE = 64


def _frame(video="v0", t=0, person="p0", labeled=True, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (120, 100, 3), dtype=np.uint8)
    kp = np.concatenate([rng.uniform(30, 70, (13, 2)), np.ones((13, 1))], axis=1).astype(np.float32)
    if not labeled:
        kp[:] = 0
    return Frame(person, video, t, image, kp, np.array([25, 20, 50, 70], np.float32), "train")


def test_joints_follow_the_crop_transform_and_source_shares_it():
    frames = [_frame(t=i, seed=i) for i in range(4)]
    cfg = DataConfig(scale_std=0.25, rot_std=30, rot_prob=1.0, flip_prob=0.0)
    ds = PairDataset(frames, SIZE, cfg, seed=3)
    item = ds[1]
    m = item["matrix"].numpy().astype(np.float64)
    expected = apply_affine(frames[1].keypoints[:, :2], m)
    assert torch.allclose(item["joints"], torch.from_numpy(expected).float(), atol=1e-4)
    assert not np.allclose(m, crop_matrix(frames[1].bbox, SIZE)), "augmentation should change the crop"
    # the source is another frame of the video warped by the very same matrix (m is float32: allow rounding)
    def diff(crop, f):
        return np.abs(crop.numpy() - to_tensor_layout(warp(f.image, m, SIZE))).mean()

    assert min(diff(item["source"], f) for f in frames if f.frame != 1) < 0.01
    assert diff(item["target"], frames[1]) < 0.01
    assert item["target"].shape == (3, SIZE, SIZE) and 0 <= item["target"].min() and item["target"].max() <= 1


def test_same_item_same_augmentation_new_epoch_new_one():
    ds = PairDataset([_frame(t=i, seed=i) for i in range(3)], SIZE, DataConfig(rot_prob=1.0), seed=0)
    a, b = ds[0]["matrix"], ds[0]["matrix"]
    ds.set_epoch(1)
    assert torch.equal(a, b) and not torch.equal(a, ds[0]["matrix"])


def test_visibility_is_zero_outside_the_crop_and_for_unlabeled_joints():
    f = _frame()
    f.keypoints[0, :2] = [2, 2]  # far outside the target box's crop
    f.keypoints[1, 2] = 0
    item = PairDataset([f, _frame(t=1)], SIZE, DataConfig(), augment=False)[0]
    assert item["visible"][0] == 0 and item["visible"][1] == 0 and item["visible"][2:].sum() == 11


def test_flip_swaps_left_and_right():
    f = _frame()
    cfg = DataConfig(scale_std=0.0, rot_prob=0.0, flip_prob=1.0)
    item = PairDataset([f], SIZE, cfg)[0]
    plain = apply_affine(f.keypoints[:, :2], crop_matrix(f.bbox, SIZE))
    perm = PENN.flip_permutation()
    # after flipping, "left wrist" (5) sits where the mirrored right wrist (6) was
    assert np.allclose(item["joints"][5, 0].item(), SIZE - 1 - plain[6, 0], atol=1e-4)
    assert np.allclose(item["joints"][5, 1].item(), plain[6, 1], atol=1e-4)
    assert perm[5] == 6 and perm[0] == 0


def test_flip_swaps_the_datasets_own_pairs():
    """Human3.6M's 17 joints pair up otherwise than Penn Action's 13: its right hip (1) mirrors to the left hip (4),
    not to the right knee (2)."""
    rng = np.random.default_rng(0)
    kp = np.concatenate([rng.uniform(30, 70, (17, 2)), np.ones((17, 1))], axis=1).astype(np.float32)
    f = Frame("p0", "v0", 0, rng.integers(0, 255, (120, 100, 3), dtype=np.uint8), kp,
              np.array([25, 20, 50, 70], np.float32), "train")
    item = PairDataset([f], SIZE, DataConfig(dataset="h36m", scale_std=0.0, rot_prob=0.0, flip_prob=1.0))[0]
    plain = apply_affine(kp[:, :2], crop_matrix(f.bbox, SIZE))
    assert np.allclose(item["joints"][1].numpy(), [SIZE - 1 - plain[4, 0], plain[4, 1]], atol=1e-4)
    assert np.allclose(item["joints"][9].numpy(), [SIZE - 1 - plain[9, 0], plain[9, 1]], atol=1e-4)  # the nose


def test_prepare_frame_and_person_helpers():
    frames = [_frame("v1", 1), _frame("v0", 2), _frame("v0", 1), _frame("extra-v2", 0, labeled=False)]
    crop, m = prepare_frame(frames[0], SIZE)
    assert crop.shape == (3, SIZE, SIZE) and np.allclose(m, crop_matrix(frames[0].bbox, SIZE))
    stream = person_stream(frames)
    assert [(f.video_id, f.frame) for f in stream] == [("v0", 1), ("v0", 2), ("v1", 1)]
    pool = person_set(frames)
    assert len(pool) == 4 and not pool[-1].labeled
    crops, mats, groups = prepare_frames(pool, SIZE)
    assert crops.shape == (4, 3, SIZE, SIZE) and mats.shape == (4, 2, 3) and groups.tolist() == [0, 0, 1, 2]
    with pytest.raises(ValueError, match="one person"):
        person_stream(frames + [_frame(person="p1")])


def test_cross_video_source_comes_from_another_video_cropped_by_its_own_box():
    same = [_frame(video="v0", t=i, seed=i) for i in range(3)]
    other = Frame("p0", "v1", 0, _frame(seed=9).image, _frame(seed=9).keypoints, np.array([5, 10, 60, 80], np.float32),
                  "train")
    frames = [*same, other, _frame(video="v0", person="p1", seed=5)]  # p1: another person, never a source of p0

    def diff(crop, f, box):
        return np.abs(crop.numpy() - to_tensor_layout(warp(f.image, crop_matrix(box, SIZE), SIZE))).mean()

    cross = PairDataset(frames, SIZE, DataConfig(cross_video=1.0), augment=False)
    for i in range(3):
        assert diff(cross[i]["source"], other, other.bbox) < 0.01  # its own box, not the target's
        assert diff(cross[i]["source"], other, same[i].bbox) > 0.05
    # a video with no other video of its person falls back to its own video; cross_video=0 never leaves it
    assert diff(cross[4]["source"], frames[4], frames[4].bbox) < 0.01
    plain = PairDataset(frames, SIZE, DataConfig(), augment=False)
    assert all(min(diff(plain[i]["source"], f, same[i].bbox) for f in same if f.frame != i) < 0.01 for i in range(3))
