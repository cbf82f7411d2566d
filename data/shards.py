"""Parquet shards of pose frames, one row per frame, read and written through fsspec URLs.

A dataset is a directory (`/path`, `file://`, `s3://`) of `part-NNNNN.parquet`
files plus `manifest.json`. Each part is written under a temporary name and
moved into place, and the manifest is written last and lists the parts: a
directory without a manifest is an unfinished (or foreign) dataset and every
reader here refuses it, and a reader never picks up a stray part of a crashed
run because it reads the files the manifest names, not a glob.

The parts are plain Parquet, so `ray.data.read_parquet(url)` reads them too
(its default `file_extensions=["parquet"]` skips `manifest.json`).
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Iterable

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from model.io import exists, filesystem, join, read_bytes, write_bytes_atomic
from model.joints import JointSet, dataset_joint_set

FORMAT = "posettp-shards/1"
MANIFEST = "manifest.json"
ROW_GROUP_ROWS = 256  # a few MB of JPEGs at 128x128: small enough to stream, large enough to scan fast
ROWS_PER_SHARD = 4096

SCHEMA = pa.schema([
    ("person_id", pa.string()),
    ("video_id", pa.string()),
    ("frame", pa.int32()),
    ("image", pa.binary()),  # JPEG bytes
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("keypoints", pa.list_(pa.float32())),  # J x [x, y, visible], flattened
    ("bbox", pa.list_(pa.float32())),  # x, y, w, h in pixels
    ("split", pa.string()),
])


@dataclass
class Frame:
    """One decoded row: image HxWx3 uint8 RGB, keypoints (J, 3) [x, y, visible], bbox (4,) x, y, w, h."""

    person_id: str
    video_id: str
    frame: int
    image: np.ndarray
    keypoints: np.ndarray
    bbox: np.ndarray
    split: str

    @property
    def labeled(self) -> bool:
        """Unlabeled frames (extra frames for TTP) carry no visible joint."""
        return bool((self.keypoints[:, 2] > 0).any())


def encode_jpeg(image_rgb: np.ndarray, quality: int = 92) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def decode_jpeg(data: bytes, what: str) -> np.ndarray:
    """JPEG bytes -> HxWx3 uint8 RGB; `what` names the frame in the error."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{what}: image bytes are not a decodable JPEG")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _part_name(i: int) -> str:
    return f"part-{i:05d}.parquet"


def _remove(url: str) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path)


def _clear(url: str) -> None:
    """Make room for a new dataset at `url`: the manifest goes first so the old one stops looking complete."""
    _remove(join(url, MANIFEST))
    fs, path = filesystem(url)
    for old in fs.glob(f"{path.rstrip('/')}/part-*.parquet"):
        fs.rm(old)


def _table(rows: list[dict], num_joints: int) -> pa.Table:
    for r in rows:
        if len(r["keypoints"]) != num_joints * 3:
            raise ValueError(f"row {r['person_id']}/{r['video_id']}/{r['frame']}: {len(r['keypoints'])} keypoint "
                             f"values, expected {num_joints} joints x 3")
        if len(r["bbox"]) != 4:
            raise ValueError(f"row {r['person_id']}/{r['video_id']}/{r['frame']}: bbox must be x, y, w, h")
    cols = {name: [r[name] for r in rows] for name in SCHEMA.names}
    cols["keypoints"] = [np.asarray(v, np.float32).reshape(-1) for v in cols["keypoints"]]
    cols["bbox"] = [np.asarray(v, np.float32).reshape(-1) for v in cols["bbox"]]
    return pa.table({name: pa.array(cols[name], type=SCHEMA.field(name).type) for name in SCHEMA.names},
                    schema=SCHEMA)


def write_shards(rows: Iterable[dict], url: str, manifest: dict, rows_per_shard: int = ROWS_PER_SHARD) -> dict:
    """Write rows (dicts with the SCHEMA fields) as parts, then `manifest.json`; returns the manifest written.

    `manifest` must name the dataset and its `joints`; this adds the format, the
    part list, row counts and per-split person/frame counts. On any error the
    parts written so far are removed and no manifest is left behind.
    """
    num_joints = len(manifest["joints"])
    _clear(url)
    files: list[str] = []
    splits: dict[str, dict] = {}
    persons: dict[str, set] = {}

    def flush(buf: list[dict]) -> None:
        sink = io.BytesIO()
        pq.write_table(_table(buf, num_joints), sink, row_group_size=ROW_GROUP_ROWS)
        name = _part_name(len(files))
        write_bytes_atomic(join(url, name), sink.getvalue())
        files.append(name)

    try:
        buf: list[dict] = []
        for row in rows:
            s = splits.setdefault(row["split"], {"persons": 0, "frames": 0, "labeled_frames": 0})
            persons.setdefault(row["split"], set()).add(row["person_id"])
            s["frames"] += 1
            s["labeled_frames"] += int(np.any(np.asarray(row["keypoints"]).reshape(-1, 3)[:, 2] > 0))
            buf.append(row)
            if len(buf) >= rows_per_shard:
                flush(buf)
                buf = []
        if buf:
            flush(buf)
        if not files:
            raise ValueError(f"no frames to write to {url}")
        for split, ids in persons.items():
            splits[split]["persons"] = len(ids)
        out = {**manifest, "format": FORMAT, "num_joints": num_joints, "files": files,
               "rows": sum(s["frames"] for s in splits.values()), "splits": splits}
        write_bytes_atomic(join(url, MANIFEST), json.dumps(out, indent=2).encode())
        return out
    except BaseException:
        for name in files:
            _remove(join(url, name))
        raise


def read_manifest(url: str) -> dict:
    murl = join(url, MANIFEST)
    if not exists(murl):
        raise FileNotFoundError(f"{url} has no {MANIFEST}: not a complete posettp dataset "
                                "(the writer did not finish, or this is not a shard directory)")
    manifest = json.loads(read_bytes(murl))
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{murl}: unknown format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def read_joint_set(url: str) -> JointSet:
    """The dataset's joint set as its manifest records it (a manifest from before joint sets: its dataset's)."""
    manifest = read_manifest(url)
    if "joint_set" in manifest:
        return JointSet.from_dict(manifest["joint_set"])
    js = dataset_joint_set(manifest.get("dataset", "synth"))
    if manifest.get("joints") and len(manifest["joints"]) != js.size:
        raise ValueError(f"{url}: the manifest lists {len(manifest['joints'])} joints, dataset "
                         f"{manifest.get('dataset')!r} has the {js.describe()} joint set")
    return js


def read_table(url: str, split: str | None = None, persons: Iterable[str] | None = None,
               columns: list[str] | None = None) -> pa.Table:
    """Rows of the parts the manifest names, filtered by split and person ids (pushed down to row groups)."""
    manifest = read_manifest(url)
    fs, path = filesystem(url)
    paths = [f"{path.rstrip('/')}/{name}" for name in manifest["files"]]
    filters = []
    if split is not None:
        filters.append(("split", "=", split))
    if persons is not None:
        filters.append(("person_id", "in", list(persons)))
    return pq.read_table(paths, filesystem=fs, columns=columns, filters=filters or None, schema=SCHEMA)


def list_persons(url: str, split: str | None = None) -> list[str]:
    table = read_table(url, split=split, columns=["person_id"])
    return sorted(set(table.column("person_id").to_pylist()))


def load_frames(url: str, split: str | None = None, person: str | None = None) -> list[Frame]:
    """Decoded frames sorted by (person_id, video_id, frame)."""
    table = read_table(url, split=split, persons=None if person is None else [person])
    frames = []
    for r in table.to_pylist():
        what = f"{url}: {r['person_id']}/{r['video_id']}/{r['frame']}"
        frames.append(Frame(r["person_id"], r["video_id"], int(r["frame"]), decode_jpeg(r["image"], what),
                            np.asarray(r["keypoints"], np.float32).reshape(-1, 3),
                            np.asarray(r["bbox"], np.float32), r["split"]))
    frames.sort(key=lambda f: (f.person_id, f.video_id, f.frame))
    return frames


def copy_dataset(src: str, dst: str) -> dict:
    """Copy a complete dataset between URLs (e.g. local -> s3://), byte for byte, manifest last."""
    manifest = read_manifest(src)
    _clear(dst)
    for name in manifest["files"]:
        write_bytes_atomic(join(dst, name), read_bytes(join(src, name)))
    write_bytes_atomic(join(dst, MANIFEST), read_bytes(join(src, MANIFEST)))
    return manifest
