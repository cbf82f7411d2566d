"""Joint sets: what a dataset's keypoints are and how they are scored, as data.

A joint set names the joints in order, their left/right pairs (which a mirror swaps), the bones to draw, and
the metric its dataset's protocol reports with its normaliser. Each dataset names one (`DATASET_JOINT_SETS`);
shard manifests and checkpoints carry it, and training, the flip test, augmentation, evaluation, serving and
the overlays all read it from there instead of guessing from a joint count (Human3.6M and COCO both have 17).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


class JointSetMismatch(ValueError):
    """A model and the data (or two inputs) disagree about the joints."""


@dataclass(frozen=True)
class JointSet:
    name: str
    joints: tuple[str, ...]
    flip_pairs: tuple[tuple[int, int], ...]
    skeleton: tuple[tuple[int, int], ...]
    # "torso": PCK@a with a = alpha x shoulder-centre-to-hip-centre distance (`torso` = shoulders, hips);
    # "box": PCK@a with a = alpha x the longer side of the person box; "macc": within 6 px at half resolution
    normaliser: str
    torso: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())
    unscored: tuple[int, ...] = ()  # joints the metric leaves out (trained and predicted all the same)

    @property
    def size(self) -> int:
        return len(self.joints)

    @property
    def metric_keys(self) -> list[str]:
        """The numbers reported, the headline first."""
        return ["macc"] if self.normaliser == "macc" else ["pck@0.2", "pck@0.5"]

    @property
    def headline(self) -> str:
        return self.metric_keys[0]

    def flip_permutation(self) -> np.ndarray:
        """Joint order after a horizontal mirror: left and right swapped."""
        perm = np.arange(self.size)
        for a, b in self.flip_pairs:
            perm[a], perm[b] = b, a
        return perm

    def describe(self) -> str:
        return f"{self.name} ({self.size} joints)"

    def to_dict(self) -> dict:
        return {k: [list(v) for v in val] if k in ("flip_pairs", "skeleton", "torso") else
                (list(val) if isinstance(val, tuple) else val) for k, val in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "JointSet":
        """A joint set as a manifest or a checkpoint records it; checked so that bad indices fail here."""
        try:
            js = cls(name=str(d["name"]), joints=tuple(str(j) for j in d["joints"]),
                     flip_pairs=tuple((int(a), int(b)) for a, b in d["flip_pairs"]),
                     skeleton=tuple((int(a), int(b)) for a, b in d["skeleton"]), normaliser=str(d["normaliser"]),
                     torso=tuple(tuple(int(i) for i in part) for part in d.get("torso", ((), ()))),
                     unscored=tuple(int(i) for i in d.get("unscored", ())))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed joint set {d!r}: {exc}") from exc
        js.check()
        return js

    def check(self) -> None:
        indices = [i for pair in self.flip_pairs + self.skeleton for i in pair] + [i for p in self.torso for i in p]
        indices += list(self.unscored)
        if any(not 0 <= i < self.size for i in indices):
            raise ValueError(f"joint set {self.name}: an index is outside its {self.size} joints")
        if self.normaliser not in ("torso", "box", "macc"):
            raise ValueError(f"joint set {self.name}: unknown normaliser {self.normaliser!r}")
        if self.normaliser == "torso" and not all(self.torso):
            raise ValueError(f"joint set {self.name}: a torso normaliser needs shoulder and hip indices")


def _pairs(joints: tuple[str, ...], *names: tuple[str, str]) -> tuple[tuple[int, int], ...]:
    return tuple((joints.index(a), joints.index(b)) for a, b in names)


def _sides(joints: tuple[str, ...]) -> tuple[tuple[int, int], ...]:
    """Every left_X with its right_X."""
    return tuple((i, joints.index("right_" + j[5:])) for i, j in enumerate(joints)
                 if j.startswith("left_") and "right_" + j[5:] in joints)


# Penn Action (and the synthetic persons): head, then left before right
PENN_JOINTS = ("head", "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
               "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle")
PENN = JointSet("penn", PENN_JOINTS, _sides(PENN_JOINTS), _pairs(
    PENN_JOINTS, ("head", "left_shoulder"), ("head", "right_shoulder"), ("left_shoulder", "right_shoulder"),
    ("left_shoulder", "left_elbow"), ("left_elbow", "left_wrist"), ("right_shoulder", "right_elbow"),
    ("right_elbow", "right_wrist"), ("left_shoulder", "left_hip"), ("right_shoulder", "right_hip"),
    ("left_hip", "right_hip"), ("left_hip", "left_knee"), ("left_knee", "left_ankle"), ("right_hip", "right_knee"),
    ("right_knee", "right_ankle")), "torso", ((1, 2), (7, 8)))

# Human3.6M's 17 (the 3DMPPE / I2L-MeshNet order)
H36M_JOINTS = ("pelvis", "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle", "torso",
               "neck", "nose", "head", "left_shoulder", "left_elbow", "left_wrist", "right_shoulder", "right_elbow",
               "right_wrist")
H36M = JointSet("h36m", H36M_JOINTS, _sides(H36M_JOINTS), _pairs(
    H36M_JOINTS, ("pelvis", "right_hip"), ("right_hip", "right_knee"), ("right_knee", "right_ankle"),
    ("pelvis", "left_hip"), ("left_hip", "left_knee"), ("left_knee", "left_ankle"), ("pelvis", "torso"),
    ("torso", "neck"), ("neck", "nose"), ("nose", "head"), ("neck", "left_shoulder"),
    ("left_shoulder", "left_elbow"), ("left_elbow", "left_wrist"), ("neck", "right_shoulder"),
    ("right_shoulder", "right_elbow"), ("right_elbow", "right_wrist")), "torso", ((11, 14), (1, 4)),
    unscored=(0,))  # scored over 16 joints: the pelvis is the root the others are measured from

# BBC Pose's 7 (upper body; the dataset lists right before left)
BBC_JOINTS = ("head", "right_wrist", "left_wrist", "right_elbow", "left_elbow", "right_shoulder", "left_shoulder")
BBC = JointSet("bbc", BBC_JOINTS, ((1, 2), (3, 4), (5, 6)), _pairs(
    BBC_JOINTS, ("head", "right_shoulder"), ("head", "left_shoulder"), ("right_shoulder", "left_shoulder"),
    ("right_shoulder", "right_elbow"), ("right_elbow", "right_wrist"), ("left_shoulder", "left_elbow"),
    ("left_elbow", "left_wrist")), "macc")

# COCO's 17 keypoints (PoseTrack 2018 labels people in this layout)
COCO_JOINTS = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
               "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
               "right_knee", "left_ankle", "right_ankle")
COCO = JointSet("coco", COCO_JOINTS, _sides(COCO_JOINTS), _pairs(
    COCO_JOINTS, ("nose", "left_eye"), ("nose", "right_eye"), ("left_eye", "left_ear"), ("right_eye", "right_ear"),
    ("left_shoulder", "right_shoulder"), ("left_shoulder", "left_elbow"), ("left_elbow", "left_wrist"),
    ("right_shoulder", "right_elbow"), ("right_elbow", "right_wrist"), ("left_shoulder", "left_hip"),
    ("right_shoulder", "right_hip"), ("left_hip", "right_hip"), ("left_hip", "left_knee"),
    ("left_knee", "left_ankle"), ("right_hip", "right_knee"), ("right_knee", "right_ankle")), "box")

JOINT_SETS = {js.name: js for js in (PENN, H36M, BBC, COCO)}
DATASET_JOINT_SETS = {"synth": "penn", "penn": "penn", "h36m": "h36m", "bbc": "bbc", "posetrack": "coco"}


def joint_set(name: str) -> JointSet:
    if name not in JOINT_SETS:
        raise ValueError(f"unknown joint set {name!r}; known: {', '.join(JOINT_SETS)}")
    return JOINT_SETS[name]


def dataset_joint_set(dataset: str) -> JointSet:
    if dataset not in DATASET_JOINT_SETS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(DATASET_JOINT_SETS)}")
    return JOINT_SETS[DATASET_JOINT_SETS[dataset]]


def require_same(ours: JointSet, ours_what: str, theirs: JointSet, theirs_what: str) -> None:
    """Refuse, in one line naming both, a model and data whose joints differ."""
    if ours.joints != theirs.joints:
        raise JointSetMismatch(f"{ours_what} has the {ours.describe()} joint set but {theirs_what} has "
                               f"{theirs.describe()}: they must be the same")
