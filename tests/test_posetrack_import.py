"""PoseTrack 2018 importer: a tiny dataset in the real layout -> shards (tracks as persons, unlabeled frames kept
for TTP); bad input fails naming the file and leaves no manifest."""
import json

import numpy as np
import pytest

from data.importers import convert
from data.shards import MANIFEST, load_frames, read_table
from model.joints import COCO, COCO_JOINTS
from tests.fixtures_posetrack import write_posetrack

V1 = "000001_bonn_train"


def _annotations(src, part, video):
    d = json.loads((src / "annotations" / part / f"{video}.json").read_text())
    return {(a["image_id"] % 10000, a["track_id"]): a for a in d["annotations"] if "keypoints" in a}


def test_manifest_splits_and_persons(tmp_path):
    write_posetrack(tmp_path / "pt")
    m = convert("posetrack", tmp_path / "pt", str(tmp_path / "out"))
    assert (m["dataset"], m["joints"], m["num_joints"]) == ("posetrack", list(COCO_JOINTS), 17)
    assert m["flip_pairs"] == [list(p) for p in COCO.flip_pairs] and m["joint_set"] == COCO.to_dict()
    # train: video 1 has 2 tracks (labeled at 0, 2, 4 and at 0, 2; unlabeled within that span: 1, 3 and 1), video 2
    # one (3 + 2); test: 2 x (3 + 2). Frame 5 is after every track's last label: left out
    assert m["splits"] == {"train": {"persons": 3, "frames": 13, "labeled_frames": 8},
                           "test": {"persons": 2, "frames": 10, "labeled_frames": 6}}
    persons = sorted(set(read_table(str(tmp_path / "out"), columns=["person_id"]).column("person_id").to_pylist()))
    assert persons == [f"{V1}-t1", f"{V1}-t2", "000002_mpii_train-t1", "000003_bonn-t1", "000003_bonn-t2"]


def test_labeled_and_unlabeled_frames(tmp_path):
    src = write_posetrack(tmp_path / "pt")
    convert("posetrack", src, str(tmp_path / "out"))
    ann = _annotations(src, "train", V1)
    t1 = load_frames(str(tmp_path / "out"), person=f"{V1}-t1")
    assert [(f.video_id, f.frame, f.labeled) for f in t1] == [(V1, k, k % 2 == 0) for k in range(5)]
    f = t1[2]
    assert (f.split, f.image.shape) == ("train", (80, 96, 3))
    want = np.asarray(ann[2, 1]["keypoints"], np.float32).reshape(17, 3)
    assert np.allclose(f.keypoints[5:], want[5:]) and np.allclose(f.keypoints[0], want[0])
    assert (f.keypoints[1:3] == 0).all()  # head_bottom / head_top are not COCO's eyes: emptied
    assert (f.keypoints[3:5] == 0).all()  # ears: never annotated in PoseTrack
    assert f.bbox.tolist() == ann[2, 1]["bbox"]
    assert (t1[1].keypoints == 0).all() and t1[1].bbox.tolist() == ann[0, 1]["bbox"]  # tie -> earlier frame
    assert t1[3].bbox.tolist() == ann[2, 1]["bbox"]
    t2 = load_frames(str(tmp_path / "out"), person=f"{V1}-t2")
    assert [(f.frame, f.labeled) for f in t2] == [(0, True), (1, False), (2, True)]  # 3, 5: past its last label
    assert t2[0].keypoints[15, 2] == 0 and t2[0].keypoints[16, 2] == 1  # occluded left ankle
    stored = read_table(str(tmp_path / "out"), persons=[f"{V1}-t2"], columns=["frame", "image"]).to_pylist()
    assert all(r["image"] == (src / "images" / "train" / V1 / f"{r['frame']:06d}.jpg").read_bytes() for r in stored)
    test = load_frames(str(tmp_path / "out"), split="test")
    assert {f.person_id for f in test} == {"000003_bonn-t1", "000003_bonn-t2"}


def test_coco_layout_and_posetrack_data_folder(tmp_path):
    write_posetrack(tmp_path / "pt" / "posetrack_data", names=COCO_JOINTS)
    convert("posetrack", tmp_path / "pt", str(tmp_path / "out"))
    f = load_frames(str(tmp_path / "out"), person=f"{V1}-t1")[0]
    assert (f.keypoints[1:3, 2] == 1).all()  # COCO names: the eye slots are kept as they are


@pytest.mark.parametrize("names, match", [(COCO_JOINTS[:16], "names 16 keypoints, expected 17"),
                                          (COCO_JOINTS[::-1], "neither COCO's nor PoseTrack 2018's")])
def test_other_keypoint_names_are_refused(tmp_path, names, match):
    write_posetrack(tmp_path / "pt", names=names)
    with pytest.raises(ValueError, match=f"{V1}.json: .*{match}"):
        convert("posetrack", tmp_path / "pt", str(tmp_path / "out"))
    assert not (tmp_path / "out" / MANIFEST).exists()


def _edit(path, change):
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))


def _wrong_length(d):
    d["annotations"][0]["keypoints"] = d["annotations"][0]["keypoints"][:48]


def _bad(src):
    (src / "annotations" / "val" / "000003_bonn.json").write_text('{"images": [')


@pytest.mark.parametrize("breaks, error, match", [
    (lambda src: [p.unlink() for p in (src / "annotations").rglob("*.json")], FileNotFoundError,
     "annotations: no PoseTrack annotation files"),
    (_bad, ValueError, "val/000003_bonn.json: not valid JSON"),
    (lambda src: _edit(src / "annotations" / "train" / f"{V1}.json", _wrong_length), ValueError,
     f"{V1}.json: annotation 0 .* has 48 keypoint values, expected 17 joints x 3"),
    (lambda src: (src / "images" / "train" / V1 / "000003.jpg").unlink(), FileNotFoundError,
     f"{V1}/000003.jpg: frame image is missing"),
])
def test_bad_input_names_the_file(tmp_path, breaks, error, match):
    src = write_posetrack(tmp_path / "pt")
    breaks(src)
    with pytest.raises(error, match=match):
        convert("posetrack", src, str(tmp_path / "out"))
    assert not (tmp_path / "out" / MANIFEST).exists() and not list((tmp_path / "out").glob("part-*"))
