"""Importers: tiny fixtures in each dataset's own on-disk format -> shards; bad input fails clearly, leaves nothing."""
import json

import cv2
import numpy as np
import pytest
import scipy.io

from data.importers import convert
from data.shards import MANIFEST, load_frames, read_manifest, read_table
from posettp.cli import main as cli


def _jpeg(path, w=48, h=40, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    cv2.imwrite(str(path), img)


def _penn(src, videos=(("0001", 1, 3), ("0002", -1, 2)), joints=13, drop_field=None):
    for vid, train, n in videos:
        x = np.tile(np.arange(1, joints + 1, dtype=float), (n, 1)) + np.arange(n)[:, None]
        y = np.full((n, joints), 10.0)
        vis = np.ones((n, joints))
        vis[:, 0] = 0
        d = {"x": x, "y": y, "visibility": vis, "bbox": np.tile([2.0, 3.0, 30.0, 35.0], (n, 1)),
             "train": np.array([[train]]), "action": "tennis_serve", "pose": "back", "nframes": np.array([[n]]),
             "dimensions": np.array([[40, 48, n]])}
        d.pop(drop_field, None)
        (src / "labels").mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(src / "labels" / f"{vid}.mat", d)
        for i in range(n):
            _jpeg(src / "frames" / vid / f"{i + 1:06d}.jpg", seed=i)


def test_penn(tmp_path):
    _penn(tmp_path / "penn")
    m = convert("penn", tmp_path / "penn", str(tmp_path / "out"))
    assert m["dataset"] == "penn" and m["num_joints"] == 13
    assert m["splits"] == {"train": {"persons": 1, "frames": 3, "labeled_frames": 3},
                           "test": {"persons": 1, "frames": 2, "labeled_frames": 2}}
    f = load_frames(str(tmp_path / "out"), person="0001")[1]
    assert (f.video_id, f.frame, f.image.shape) == ("0001", 2, (40, 48, 3))
    assert f.keypoints[3].tolist() == [4.0, 9.0, 1.0]  # x = 4 + frame offset 1, minus 1 (0-based); y = 10 - 1
    assert f.keypoints[0, 2] == 0
    assert f.bbox.tolist() == [1.0, 2.0, 28.0, 32.0]  # x1, y1, x2, y2 (1-based) -> x, y, w, h (0-based)
    stored = read_table(str(tmp_path / "out"), persons=["0001"], columns=["frame", "image"]).to_pylist()
    assert all(r["image"] == (tmp_path / "penn" / "frames" / "0001" / f"{r['frame']:06d}.jpg").read_bytes()
               for r in stored)  # JPEGs are stored as they were, not re-encoded


def test_bbc(tmp_path):
    src = tmp_path / "bbc"
    fields = ["videoName", "type", "source", "train_frames", "train_joints", "test_frames", "test_joints"]
    arr = np.zeros((1, 12), dtype=[(f, object) for f in fields])
    for i in range(12):
        for f in fields:
            arr[0, i][f] = np.zeros((0, 0))
        arr[0, i]["videoName"] = f"video{i + 1}"
    joints = np.stack([np.tile(np.linspace(5, 40, 7), (2, 1))] * 2, axis=2)  # (2, 7, 2)
    arr[0, 0]["type"], arr[0, 0]["train_frames"], arr[0, 0]["train_joints"] = "train", np.array([[101, 205]]), joints
    arr[0, 10]["type"], arr[0, 10]["test_frames"], arr[0, 10]["test_joints"] = "test", np.array([[7, 9]]), joints
    src.mkdir()
    scipy.io.savemat(src / "bbcpose.mat", {"bbcpose": arr})
    for video, frames in (("1", (101, 205)), ("11", (7, 9))):
        for fr in frames:
            _jpeg(src / video / f"{fr}.jpg", w=72, h=48)
    m = convert("bbc", src, str(tmp_path / "out"))
    assert m["num_joints"] == 7 and m["joints"][1] == "right_wrist" and m["flip_pairs"][0] == [1, 2]
    assert {s: c["frames"] for s, c in m["splits"].items()} == {"train": 2, "test": 2}
    f = load_frames(str(tmp_path / "out"), split="test")[0]
    assert (f.person_id, f.frame) == ("11", 7)
    assert np.allclose(f.keypoints[:, 0], np.linspace(5, 40, 7) - 1) and (f.keypoints[:, 2] == 1).all()
    assert f.bbox.tolist() == [0.0, 0.0, 71.0, 47.0]  # joints +- 60 px, clipped to the 72x48 image


def _h36m(src, joints=17):
    ann = src / "annotations"
    ann.mkdir(parents=True)
    cam = {"R": np.eye(3).tolist(), "t": [0, 0, 5000], "f": [1000, 1000], "c": [32, 24]}
    world = np.stack([np.linspace(-140, 140, joints), np.linspace(-100, 100, joints), np.zeros(joints)], 1)
    world[0] = [5000, 0, 0]  # projects outside the image -> not visible
    for subject in (1, 9):
        images, annots = [], []
        for k, frame in enumerate((0, 3, 5)):  # frame 3 is skipped by the stride of 5
            name = f"s_{subject:02d}_act_02_subact_01_ca_01/s_{subject:02d}_act_02_subact_01_ca_01_{frame + 1:06d}.jpg"
            images.append({"id": k, "file_name": name, "width": 64, "height": 48, "subject": subject,
                           "action_idx": 2, "subaction_idx": 1, "cam_idx": 1, "frame_idx": frame})
            annots.append({"id": k, "image_id": k, "bbox": [10, 4, 40, 40], "keypoints_vis": [True] * 17})
            _jpeg(src / "images" / name, w=64, h=48)
        (ann / f"Human36M_subject{subject}_data.json").write_text(json.dumps({"images": images,
                                                                             "annotations": annots}))
        (ann / f"Human36M_subject{subject}_camera.json").write_text(json.dumps({"1": cam}))
        jw = {"2": {"1": {str(fr): world.tolist() for fr in (0, 3, 5)}}}
        (ann / f"Human36M_subject{subject}_joint_3d.json").write_text(json.dumps(jw))


def test_h36m(tmp_path):
    _h36m(tmp_path / "h36m")
    m = convert("h36m", tmp_path / "h36m", str(tmp_path / "out"))
    assert m["num_joints"] == 17
    assert {s: (c["persons"], c["frames"]) for s, c in m["splits"].items()} == {"train": (1, 2), "test": (1, 2)}
    frames = load_frames(str(tmp_path / "out"), person="S9")
    assert [f.frame for f in frames] == [0, 5] and frames[0].video_id == "s_09_act_02_subact_01_ca_01"
    kp = frames[0].keypoints
    assert np.allclose(kp[1:, 0], np.linspace(-140, 140, 17)[1:] / 5 + 32)  # f x / z + c
    assert kp[0, 2] == 0 and (kp[1:, 2] == 1).all()
    assert frames[0].bbox.tolist() == [10, 4, 40, 40]


def _assert_nothing_left(out):
    assert not (out / MANIFEST).exists()
    assert not out.exists() or not list(out.glob("part-*"))
    with pytest.raises(FileNotFoundError):
        read_manifest(str(out))


def test_missing_frame(tmp_path):
    _penn(tmp_path / "penn")
    (tmp_path / "penn" / "frames" / "0002" / "000002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="0002/000002.jpg: frame image is missing"):
        convert("penn", tmp_path / "penn", str(tmp_path / "out"))
    _assert_nothing_left(tmp_path / "out")


def test_mat_with_wrong_fields(tmp_path):
    _penn(tmp_path / "penn", drop_field="visibility")
    with pytest.raises(ValueError, match=r"0001.mat: missing field\(s\) \['visibility'\]"):
        convert("penn", tmp_path / "penn", str(tmp_path / "out"))
    _assert_nothing_left(tmp_path / "out")


def test_corrupt_jpeg(tmp_path):
    _penn(tmp_path / "penn")
    path = tmp_path / "penn" / "frames" / "0002" / "000001.jpg"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="0002/000001.jpg: not a complete JPEG"):
        convert("penn", tmp_path / "penn", str(tmp_path / "out"))
    _assert_nothing_left(tmp_path / "out")


def test_joint_count_mismatch(tmp_path):
    _penn(tmp_path / "penn", videos=(("0001", 1, 2),), joints=12)
    with pytest.raises(ValueError, match="0001.mat: x has shape \\(2, 12\\).*13 joints"):
        convert("penn", tmp_path / "penn", str(tmp_path / "out"))
    _h36m(tmp_path / "h36m", joints=16)
    with pytest.raises(ValueError, match="joint_3d.json: subject 1 .* shape \\(16, 3\\)"):
        convert("h36m", tmp_path / "h36m", str(tmp_path / "out2"))
    _assert_nothing_left(tmp_path / "out2")


def test_cli_reports_bad_input_with_the_file(tmp_path, capsys):
    _penn(tmp_path / "penn")
    (tmp_path / "penn" / "labels" / "0002.mat").write_bytes(b"not a mat file")
    assert cli(["import", "penn", "--src", str(tmp_path / "penn"), "--out", str(tmp_path / "out")]) == 2
    assert "0002.mat: not a readable .mat file" in capsys.readouterr().err
    _assert_nothing_left(tmp_path / "out")
    assert cli(["import", "bbc", "--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
