"""Importers: tiny fixtures in each dataset's own on-disk format -> shards; bad input fails clearly, leaves nothing."""

import numpy as np
import pytest

from data.importers import convert
from data.shards import MANIFEST, load_frames, read_manifest, read_table
from posettp.cli import main as cli
from tests.fixtures_datasets import write_bbc, write_h36m, write_penn


def testwrite_penn(tmp_path):
    write_penn(tmp_path / "penn")
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
    src = write_bbc(tmp_path / "bbc")
    m = convert("bbc", src, str(tmp_path / "out"))
    assert m["num_joints"] == 7 and m["joints"][1] == "right_wrist" and m["flip_pairs"][0] == [1, 2]
    assert {s: c["frames"] for s, c in m["splits"].items()} == {"train": 2, "test": 2}
    f = load_frames(str(tmp_path / "out"), split="test")[0]
    assert (f.person_id, f.frame) == ("11", 7)
    assert np.allclose(f.keypoints[:, 0], np.linspace(5, 40, 7) - 1) and (f.keypoints[:, 2] == 1).all()
    assert f.bbox.tolist() == [0.0, 0.0, 71.0, 47.0]  # joints +- 60 px, clipped to the 72x48 image


def testwrite_h36m(tmp_path):
    write_h36m(tmp_path / "h36m")
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
    write_penn(tmp_path / "penn")
    (tmp_path / "penn" / "frames" / "0002" / "000002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="0002/000002.jpg: frame image is missing"):
        convert("penn", tmp_path / "penn", str(tmp_path / "out"))
    _assert_nothing_left(tmp_path / "out")


def test_mat_with_wrong_fields(tmp_path):
    write_penn(tmp_path / "penn", drop_field="visibility")
    with pytest.raises(ValueError, match=r"0001.mat: missing field\(s\) \['visibility'\]"):
        convert("penn", tmp_path / "penn", str(tmp_path / "out"))
    _assert_nothing_left(tmp_path / "out")


def test_corrupt_jpeg(tmp_path):
    write_penn(tmp_path / "penn")
    path = tmp_path / "penn" / "frames" / "0002" / "000001.jpg"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="0002/000001.jpg: not a complete JPEG"):
        convert("penn", tmp_path / "penn", str(tmp_path / "out"))
    _assert_nothing_left(tmp_path / "out")


def test_joint_count_mismatch(tmp_path):
    write_penn(tmp_path / "penn", videos=(("0001", 1, 2),), joints=12)
    with pytest.raises(ValueError, match="0001.mat: x has shape \\(2, 12\\).*13 joints"):
        convert("penn", tmp_path / "penn", str(tmp_path / "out"))
    write_h36m(tmp_path / "h36m", joints=16)
    with pytest.raises(ValueError, match="joint_3d.json: subject 1 .* shape \\(16, 3\\)"):
        convert("h36m", tmp_path / "h36m", str(tmp_path / "out2"))
    _assert_nothing_left(tmp_path / "out2")


def test_cli_reports_bad_input_with_the_file(tmp_path, capsys):
    write_penn(tmp_path / "penn")
    (tmp_path / "penn" / "labels" / "0002.mat").write_bytes(b"not a mat file")
    assert cli(["import", "penn", "--src", str(tmp_path / "penn"), "--out", str(tmp_path / "out")]) == 2
    assert "0002.mat: not a readable .mat file" in capsys.readouterr().err
    _assert_nothing_left(tmp_path / "out")
    assert cli(["import", "bbc", "--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
