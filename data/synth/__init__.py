"""Synthetic persons benchmark (`posettp synth`): each person is a domain.

No real pose dataset can be downloaded here, so persons are rendered: a model
trained on `train` persons meets unseen `val` and `test` persons whose appearance
comes from shifted distributions (see `look.py` for what each shift component does),
which is the situation test-time personalization exists for.

Determinism: person `index` of `split` is seeded from (seed, split, index), and
video k of that person from (seed, split, index, k). So `--split test` with a
seed reproduces exactly the test persons of `--split all` with that seed, and
another seed gives a disjoint set (person ids carry the seed).

Splits for `--split all` with N persons: val = round(0.1 N), test = round(0.3 N),
train = the rest (each at least 1 when N >= 3); N >= 100 gives >= 30 test
persons, the number a +3 PCK mean TTP effect needs to be seen. With `--split
train|val|test` all N persons come from that split's distribution.

Per person: `videos` labeled videos of `frames` frames (`v0`, `v1`, ...), each
with its own motion and camera; val and test persons also get `extra_frames` unlabeled
frames from further videos (val persons too) (`extra-vK`: all keypoints zero, bbox kept, as a
detector would give), for Fig. 4-style experiments.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import cv2
import numpy as np
from tqdm import tqdm

from model.io import join, write_bytes_atomic
from model.joints import PENN

from ..shards import encode_jpeg, write_shards
from .body import MOTIONS, NOMINAL, motion
from .look import Shift, make_look, make_scene
from .render import SUPER, Person, make_tiles, make_view, render_video

DEFAULT_STRENGTH = 0.3  # chosen by the measurement in CALIBRATION
# How DEFAULT_STRENGTH was chosen; written into every manifest so a dataset says what its shift means.
CALIBRATION = {
    "measured_on": "2026-11-25, model code of commit 8bd0076 (issue 3 note)",
    "model": "configs/synth_small.yaml (2000 steps x batch 16, seed 0), trained on the 60 train persons of "
             "`posettp synth --persons 100 --frames 40 --size 96 --seed 1`",
    "pck@0.2_without_ttp": {"train persons (10)": 0.838, "val persons (10)": 0.764,
                            "test persons, shift 0.2 (30, seed 7)": 0.629,
                            "test persons, shift 0.3 (30, seed 7)": 0.555,
                            "test persons, shift 0.4 (30, seed 7)": 0.475,
                            "test persons, shift 0.5 (30, seed 1)": 0.468},
    "rule": "test PCK@0.2 within 0.5-0.8 and clearly below train/val: shift 0.3",
}
DEFAULT_VIDEOS = 3
DEFAULT_EXTRA_FRAMES = 200
SPLITS = ("train", "val", "test")
# Persons settings are chosen on (val) must meet the shift the reported persons (test) meet: both are drawn from the
# shifted distributions, with the same extra unlabeled frames; only train persons are not.
SHIFTED = ("val", "test")
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
# Penn skeleton for drawing: head to the shoulders' midpoint is handled separately.
_BONES = ((1, 3), (3, 5), (2, 4), (4, 6), (1, 2), (7, 8), (1, 7), (2, 8), (7, 9), (9, 11), (8, 10), (10, 12))


@dataclass
class SynthConfig:
    size: int = 128
    frames: int = 40  # per video
    videos: int = DEFAULT_VIDEOS
    extra_frames: int = DEFAULT_EXTRA_FRAMES  # val and test persons only
    shift: Shift = field(default_factory=lambda: Shift.from_strength(DEFAULT_STRENGTH))
    seed: int = 0


@dataclass
class SynthFrame:
    video_id: str
    frame: int
    image: np.ndarray  # HxWx3 uint8 RGB
    keypoints: np.ndarray  # (13, 3) x, y, visible
    bbox: np.ndarray  # (4,) x, y, w, h


def person_id(seed: int, split: str, index: int) -> str:
    return f"s{seed}-{split}-{index:04d}"


def make_person(cfg: SynthConfig, split: str, index: int) -> Person:
    """The person's look, motion style and static scene; validation and test persons are shifted alike."""
    # separate streams, so the shift (which changes what the look and scene draw) never changes motion or size
    look_rng, style_rng, scene_rng = np.random.default_rng([cfg.seed, _SPLIT_CODE[split], index]).spawn(3)
    shift = cfg.shift if split in SHIFTED else Shift()
    look = make_look(look_rng, NOMINAL, shift)
    style = {"amp": style_rng.uniform(0.75, 1.2), "speed": style_rng.uniform(0.8, 1.25),
             "arm_abd": style_rng.uniform(4, 14), "stance": style_rng.uniform(2, 8), "slouch": style_rng.uniform(0, 8),
             "hand": int(style_rng.integers(3)), "motions": [MOTIONS[i] for i in style_rng.permutation(len(MOTIONS))]}
    s2 = SUPER * cfg.size
    sh, sw = int(1.45 * s2), int(2.0 * s2)
    ground = style_rng.uniform(0.8, 0.92) * sh
    height = style_rng.uniform(0.55, 0.78) * s2
    scene, family = make_scene(scene_rng, sh, sw, ground, shift.background)
    return Person(person_id(cfg.seed, split, index), split, look, style, shift, scene, family, ground, height,
                  make_tiles(look, height))


def person_frames(cfg: SynthConfig, split: str, index: int) -> Iterator[SynthFrame]:
    """All frames of one person: labeled videos, then (val and test persons) the unlabeled extra videos."""
    person = make_person(cfg, split, index)
    extra = cfg.extra_frames if split in SHIFTED else 0
    n_videos = cfg.videos + math.ceil(extra / cfg.frames)
    for k in range(n_videos):
        view_rng, motion_rng = np.random.default_rng([cfg.seed, _SPLIT_CODE[split], index, k]).spawn(2)
        labeled = k < cfg.videos
        frames = cfg.frames if labeled else min(cfg.frames, extra - (k - cfg.videos) * cfg.frames)
        view = make_view(person, cfg.size, view_rng)
        pose = motion(person.style["motions"][k % len(MOTIONS)], frames, motion_rng, person.style)
        vid = f"v{k}" if labeled else f"extra-v{k}"
        for t, (image, kp, box) in enumerate(render_video(person, view, pose)):
            yield SynthFrame(vid, t, image, kp if labeled else np.zeros_like(kp), box)


def split_plan(persons: int, split: str = "all") -> list[tuple[str, int]]:
    """(split, index) of every person to render (the rule is in the module docstring)."""
    if persons < 1:
        raise ValueError(f"--persons must be >= 1, got {persons}")
    if split != "all":
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected all or one of {SPLITS}")
        return [(split, i) for i in range(persons)]
    n_val, n_test = round(0.1 * persons), round(0.3 * persons)
    if persons >= 3:
        n_val, n_test = max(n_val, 1), max(n_test, 1)
    counts = {"train": persons - n_val - n_test, "val": n_val, "test": n_test}
    return [(s, i) for s in SPLITS for i in range(counts[s])]


class ContactSheet:
    """Keeps a few frames of the first train and test persons and draws them as a labelled grid
    (joints drawn on every second column, so the people themselves stay easy to judge)."""

    def __init__(self, persons_per_split: int = 5, columns: int = 6, tile: int = 128):
        self.rows: dict[str, list] = {"train": [], "test": []}
        self.n, self.columns, self.tile = persons_per_split, columns, tile

    def wants(self, split: str) -> bool:
        return split in self.rows and len(self.rows[split]) < self.n

    def add(self, split: str, frames: list[SynthFrame]) -> None:
        labeled = [f for f in frames if f.keypoints[:, 2].any()]
        step = max(len(labeled) // self.columns, 1)
        self.rows[split].append(labeled[::step][: self.columns])

    def image(self) -> np.ndarray:
        rows = []
        for split, persons in self.rows.items():
            for frames in persons:
                tiles = [_draw_pose(f, self.tile, joints=c % 2 == 1) for c, f in enumerate(frames)]
                tiles += [np.full((self.tile, self.tile, 3), 255, np.uint8)] * (self.columns - len(tiles))
                label = np.full((self.tile, 56, 3), 255, np.uint8)
                cv2.putText(label, split, (4, self.tile // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                            cv2.LINE_AA)
                rows.append(np.concatenate([label, *tiles], axis=1))
        return np.concatenate(rows, axis=0) if rows else np.full((8, 8, 3), 255, np.uint8)

    def png(self) -> bytes:
        ok, buf = cv2.imencode(".png", cv2.cvtColor(self.image(), cv2.COLOR_RGB2BGR))
        return buf.tobytes()


def _draw_pose(f: SynthFrame, tile: int, joints: bool) -> np.ndarray:
    img = cv2.resize(f.image, (tile, tile), interpolation=cv2.INTER_LINEAR)
    if not joints:
        return img
    k = tile / f.image.shape[0]
    pts = (f.keypoints[:, :2] + 0.5) * k - 0.5
    vis = f.keypoints[:, 2] > 0
    neck = (pts[1] + pts[2]) / 2

    def line(a, b, color):
        cv2.line(img, tuple(np.round(a).astype(int)), tuple(np.round(b).astype(int)), color, 1, cv2.LINE_AA)

    if vis[0] and vis[1] and vis[2]:
        line(pts[0], neck, (255, 255, 255))
    for a, b in _BONES:
        if vis[a] and vis[b]:
            line(pts[a], pts[b], (255, 60, 60) if (a % 2 and b % 2) else (60, 120, 255) if not (a % 2 or b % 2)
                 else (255, 255, 255))
    for (x, y), v in zip(np.round(pts).astype(int), vis):
        if v:
            cv2.circle(img, (x, y), 2, (255, 255, 0), -1, cv2.LINE_AA)
    return img


def _rows(cfg: SynthConfig, plan: list[tuple[str, int]], sheet: ContactSheet) -> Iterator[dict]:
    for split, index in tqdm(plan, desc="synth persons", unit="person"):
        pid = person_id(cfg.seed, split, index)
        frames = list(person_frames(cfg, split, index))
        if sheet.wants(split):
            sheet.add(split, frames)
        for f in frames:
            yield {"person_id": pid, "video_id": f.video_id, "frame": f.frame, "image": encode_jpeg(f.image),
                   "width": cfg.size, "height": cfg.size, "keypoints": f.keypoints.reshape(-1), "bbox": f.bbox,
                   "split": split}


def main(args) -> int:
    """`posettp synth`: write shards + manifest.json + contact_sheet.png under --out."""
    strength = DEFAULT_STRENGTH if args.shift is None else args.shift
    profile = Shift.profile_of(args.shift_components)
    cfg = SynthConfig(size=args.size, frames=args.frames,
                      videos=DEFAULT_VIDEOS if args.videos is None else args.videos,
                      extra_frames=DEFAULT_EXTRA_FRAMES if args.extra_frames is None else args.extra_frames,
                      shift=Shift.from_strength(strength, profile), seed=args.seed)
    if cfg.size < 32 or cfg.frames < 2 or cfg.videos < 1 or cfg.extra_frames < 0:
        raise ValueError("need --size >= 32, --frames >= 2, --videos >= 1 and --extra-frames >= 0")
    plan = split_plan(args.persons, args.split)
    sheet = ContactSheet()
    manifest = {
        "dataset": "synth", "joints": list(PENN.joints), "flip_pairs": [list(p) for p in PENN.flip_pairs],
        "joint_set": PENN.to_dict(),
        "generator": {"seed": cfg.seed, "size": cfg.size, "frames_per_video": cfg.frames, "videos": cfg.videos,
                      "extra_frames": cfg.extra_frames, "shift": strength, "shift_components": cfg.shift.as_dict(),
                      "shift_profile": profile.as_dict(), "persons": args.persons, "split": args.split,
                      "split_rule": "all: val=round(.1N), test=round(.3N) (>=1 each for N>=3), train=rest",
                      "calibration": CALIBRATION},
    }
    out = write_shards(_rows(cfg, plan, sheet), args.out, manifest)
    write_bytes_atomic(join(args.out, "contact_sheet.png"), sheet.png())
    counts = ", ".join(f"{s}: {c['persons']} persons / {c['frames']} frames" for s, c in out["splits"].items())
    print(f"wrote {out['rows']} frames in {len(out['files'])} parts to {args.out} ({counts})")
    return 0
