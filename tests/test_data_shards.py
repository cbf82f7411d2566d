"""Shards: schema, round trips (local, s3:// on a loopback S3 server), atomicity, and Ray Data compatibility."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from data.shards import (MANIFEST, SCHEMA, copy_dataset, encode_jpeg, list_persons, load_frames, read_manifest,
                         read_table, write_shards)
from model.io import filesystem
from model.joints import PENN_JOINTS


def _rows(persons=3, videos=2, frames=5, size=32, unlabeled_person=None):
    rng = np.random.default_rng(0)
    for p in range(persons):
        for v in range(videos):
            for t in range(frames):
                image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                kp = np.concatenate([rng.uniform(0, size - 1, (13, 2)), np.ones((13, 1))], axis=1)
                if p == unlabeled_person and v == videos - 1:
                    kp[:] = 0
                yield {"person_id": f"p{p}", "video_id": f"v{v}", "frame": t, "image": encode_jpeg(image),
                       "width": size, "height": size, "keypoints": kp.reshape(-1), "bbox": [1.0, 2.0, 20.0, 25.0],
                       "split": "test" if p == persons - 1 else "train"}


MANIFEST_IN = {"dataset": "unit", "joints": list(PENN_JOINTS)}


def test_round_trip_schema_and_counts(tmp_path):
    url = str(tmp_path / "ds")
    out = write_shards(_rows(unlabeled_person=2), url, MANIFEST_IN, rows_per_shard=7)
    assert out["files"] == [f"part-{i:05d}.parquet" for i in range(5)]  # 30 rows / 7
    assert out["splits"] == {"train": {"persons": 2, "frames": 20, "labeled_frames": 20},
                             "test": {"persons": 1, "frames": 10, "labeled_frames": 5}}
    assert pq.read_schema(tmp_path / "ds" / "part-00000.parquet").remove_metadata().equals(SCHEMA)
    assert read_manifest(url)["num_joints"] == 13
    assert list_persons(url, "train") == ["p0", "p1"]
    assert read_table(url, split="test", columns=["frame"]).num_rows == 10
    frames = load_frames(url, person="p1")
    assert [(f.video_id, f.frame) for f in frames] == [(v, t) for v in ("v0", "v1") for t in range(5)]
    f = frames[0]
    assert f.image.shape == (32, 32, 3) and f.image.dtype == np.uint8
    assert f.keypoints.shape == (13, 3) and f.bbox.tolist() == [1.0, 2.0, 20.0, 25.0] and f.labeled
    assert not any(f.labeled for f in load_frames(url, person="p2") if f.video_id == "v1")


def test_reader_refuses_directory_without_manifest(tmp_path):
    url = str(tmp_path / "ds")
    write_shards(_rows(persons=1), url, MANIFEST_IN)
    (tmp_path / "ds" / MANIFEST).unlink()
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        load_frames(url)


def test_failed_write_leaves_no_dataset(tmp_path):
    url = str(tmp_path / "ds")
    write_shards(_rows(persons=1), url, MANIFEST_IN)  # an older complete dataset at the same place

    def broken():
        yield from _rows(persons=2)
        raise RuntimeError("renderer crashed")

    with pytest.raises(RuntimeError):
        write_shards(broken(), url, MANIFEST_IN, rows_per_shard=4)
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == []
    with pytest.raises(FileNotFoundError):
        read_manifest(url)


def test_joint_count_mismatch_is_refused(tmp_path):
    with pytest.raises(ValueError, match="expected 7 joints"):
        write_shards(_rows(persons=1), str(tmp_path / "ds"), {"dataset": "x", "joints": ["j"] * 7})
    assert not (tmp_path / "ds" / MANIFEST).exists()


def test_s3_round_trip_is_byte_identical(tmp_path, s3_server):
    local = str(tmp_path / "ds")
    write_shards(_rows(), local, MANIFEST_IN, rows_per_shard=12)
    fs, _ = filesystem("s3://posettp-test")
    fs.mkdir("posettp-test")
    copy_dataset(local, "s3://posettp-test/synth")
    assert read_table("s3://posettp-test/synth", split="train").num_rows == 20
    assert [f.person_id for f in load_frames("s3://posettp-test/synth", split="test")] == ["p2"] * 10
    back = str(tmp_path / "back")
    copy_dataset("s3://posettp-test/synth", back)
    names = sorted(p.name for p in (tmp_path / "ds").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "back").iterdir())
    assert all((tmp_path / "ds" / n).read_bytes() == (tmp_path / "back" / n).read_bytes() for n in names)
    # writing straight to s3 works the same way
    write_shards(_rows(persons=1), "s3://posettp-test/direct", MANIFEST_IN)
    assert json.loads(fs.cat("posettp-test/direct/manifest.json"))["rows"] == 10


def test_ray_data_reads_the_shards(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")  # about 7 s here, mostly starting a local Ray
    url = str(tmp_path / "ds")
    write_shards(_rows(), url, MANIFEST_IN, rows_per_shard=8)
    monkeypatch.setenv("RAY_ADDRESS", "local")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        ds = ray.data.read_parquet(url)  # manifest.json is skipped by its extension
        assert ds.count() == 30
        assert set(ds.schema().names) == set(SCHEMA.names)
    finally:
        ray.shutdown()
