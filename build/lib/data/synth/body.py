"""Skeleton and motion of a synthetic person: smooth joint-angle trajectories -> 3-D joints.

A 3-D skeleton seen through an orthographic camera gives foreshortening and a
depth for every limb, which is what orders self-occlusion in the renderer.

Body frame: X = the person's left, Y = down, Z = the person's back. A limb's
direction comes from two absolute angles: `flex` swings it forward (towards -Z)
and `abd` lifts it sideways away from the body; (0, 0) hangs straight down.
Absolute (not parent-relative) angles keep arms hanging under gravity when the
torso bends, and make a waving forearm easy to state.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MOTIONS = ("walk", "wave", "squat", "jacks", "bend", "random")

# Nominal proportions in units of standing height (ankle height + shins + thighs + torso + neck + head = 1).
NOMINAL = {
    "head_r": 0.066, "neck": 0.045, "torso": 0.30, "shoulder": 0.115, "hip": 0.075,
    "upper_arm": 0.17, "forearm": 0.15, "hand": 0.055, "thigh": 0.245, "shin": 0.245, "ankle": 0.04, "foot": 0.07,
    "w_upper_arm": 0.052, "w_forearm": 0.042, "w_thigh": 0.085, "w_shin": 0.062, "w_neck": 0.036,
    "chest": 0.12,  # torso depth: the torso's width seen side on
}

# Segments with (flex, abd) angles, in this order in a Pose's `limbs` array.
SEGMENTS = ("l_uarm", "r_uarm", "l_farm", "r_farm", "l_thigh", "r_thigh", "l_shin", "r_shin")
_SIDE = np.array([1, -1, 1, -1, 1, -1, 1, -1], np.float64)  # +1 = left (towards +X)


@dataclass
class Pose:
    """Trajectories over T frames, angles in radians."""

    limbs: np.ndarray  # (T, 8, 2) flex, abd per SEGMENTS
    torso: np.ndarray  # (T, 2) forward bend, sideways lean
    yaw: np.ndarray  # (T,) facing: 0 = towards the camera, +pi/2 = the person's left towards the camera
    shift: np.ndarray  # (T, 2) root offset in body heights: x along the image, y up (jumps)


def _direction(flex, abd, side):
    """Unit vectors (..., 3) for absolute limb angles."""
    ca = np.cos(abd)
    return np.stack([side * np.sin(abd), ca * np.cos(flex), -ca * np.sin(flex)], axis=-1)


def joints_3d(pose: Pose, b: dict) -> tuple[np.ndarray, np.ndarray]:
    """(T, 13, 3) Penn joints and (T, 4, 3) extra points [neck top, l/r toe tip, pelvis] in body heights.

    Coordinates: x right in the image, y down, z away from the camera; the lowest
    foot point rests on y = 0 (minus a jump).
    """
    t = len(pose.yaw)
    f, lean = pose.torso[:, 0], pose.torso[:, 1]
    up = np.stack([np.sin(lean), -np.cos(lean) * np.cos(f), -np.cos(lean) * np.sin(f)], axis=-1)
    across = np.stack([np.cos(lean), np.sin(lean), np.zeros(t)], axis=-1)
    pelvis = np.zeros((t, 3))
    chest = pelvis + up * b["torso"]
    d = _direction(pose.limbs[..., 0], pose.limbs[..., 1], _SIDE)  # (T, 8, 3)
    j = np.zeros((t, 13, 3))
    j[:, 1] = chest + across * b["shoulder"]
    j[:, 2] = chest - across * b["shoulder"]
    j[:, 3:5] = j[:, 1:3] + d[:, 0:2] * b["upper_arm"]
    j[:, 5:7] = j[:, 3:5] + d[:, 2:4] * b["forearm"]
    j[:, 7] = pelvis + np.array([1, 0, 0]) * b["hip"]
    j[:, 8] = pelvis - np.array([1, 0, 0]) * b["hip"]
    j[:, 9:11] = j[:, 7:9] + d[:, 4:6] * b["thigh"]
    j[:, 11:13] = j[:, 9:11] + d[:, 6:8] * b["shin"]
    neck_top = chest + up * b["neck"]
    j[:, 0] = neck_top + up * b["head_r"] * 1.05
    toes = j[:, 11:13] + np.array([0, b["ankle"] * 0.8, -b["foot"]])
    extra = np.stack([neck_top, toes[:, 0], toes[:, 1], pelvis], axis=1)
    pts = np.concatenate([j, extra], axis=1)
    # facing: rotate about the vertical axis, then stand on the ground
    cy, sy = np.cos(pose.yaw)[:, None], np.sin(pose.yaw)[:, None]
    x, z = pts[..., 0].copy(), pts[..., 2].copy()
    pts[..., 0] = cy * x + sy * z
    pts[..., 2] = -sy * x + cy * z
    lowest = np.maximum(pts[:, 11:13, 1].max(axis=1) + b["ankle"], pts[:, 14:16, 1].max(axis=1))
    pts[..., 1] -= (lowest + pose.shift[:, 1])[:, None]
    pts[..., 0] += pose.shift[:, 0:1]
    return pts[:, :13], pts[:, 13:]


def _smooth_noise(rng: np.random.Generator, t: np.ndarray, n: int, periods=(25, 90)) -> np.ndarray:
    """(T, n) sums of three sinusoids with random periods (frames) and phases, in about [-1, 1]."""
    out = np.zeros((len(t), n))
    for _ in range(3):
        per = rng.uniform(*periods, size=n)
        out += np.sin(2 * np.pi * t[:, None] / per + rng.uniform(0, 2 * np.pi, n)) / 3
    return out


def motion(kind: str, frames: int, rng: np.random.Generator, style: dict) -> Pose:
    """Smooth trajectories for one video of `kind`; `style` (per person) scales amplitude, speed and posture."""
    t = np.arange(frames, dtype=np.float64)
    deg = np.pi / 180
    amp, speed = style["amp"], style["speed"]
    phase = 2 * np.pi * t * speed / rng.uniform(18, 30) + rng.uniform(0, 2 * np.pi)
    limbs = np.zeros((frames, 8, 2))
    limbs[:, 0:2, 1] = style["arm_abd"] * deg  # arms a little away from the body
    limbs[:, 4:6, 1] = style["stance"] * deg
    torso = np.zeros((frames, 2))
    torso[:, 0] = style["slouch"] * deg
    shift = np.zeros((frames, 2))
    yaw = np.full(frames, rng.uniform(-0.6, 0.6))
    sway = _smooth_noise(rng, t, 16).reshape(frames, 8, 2) * 4 * deg  # keeps every motion alive a little

    if kind == "walk":
        yaw[:] = rng.choice([-1, 1]) * rng.uniform(0.9, 1.45)
        s = np.sin(phase)
        swing = 28 * amp * deg * s
        limbs[:, 4, 0], limbs[:, 5, 0] = swing, -swing
        knee_l = (15 + 45 * np.clip(np.cos(phase + 0.6), 0, 1)) * deg
        knee_r = (15 + 45 * np.clip(np.cos(phase + 0.6 + np.pi), 0, 1)) * deg
        limbs[:, 6, 0], limbs[:, 7, 0] = limbs[:, 4, 0] - knee_l, limbs[:, 5, 0] - knee_r
        limbs[:, 0, 0], limbs[:, 1, 0] = -0.8 * swing, 0.8 * swing
        limbs[:, 2, 0] = limbs[:, 0, 0] + (20 + 10 * s) * deg
        limbs[:, 3, 0] = limbs[:, 1, 0] + (20 - 10 * s) * deg
        torso[:, 0] += 6 * deg
        travel = -rng.uniform(0.15, 0.45) * np.sign(np.sin(yaw[0]))  # forward is -sin(yaw) along the image x
        shift[:, 0] = travel * (t / max(frames - 1, 1) - 0.5)
    elif kind == "wave":
        arm = rng.integers(2) if style["hand"] == 2 else style["hand"]
        limbs[:, arm, 1] = rng.uniform(95, 135) * deg + sway[:, 0, 0] * 2
        limbs[:, arm, 0] = rng.uniform(-10, 30) * deg
        limbs[:, arm + 2, 1] = (160 + 22 * amp * np.sin(2 * phase)) * deg
        limbs[:, arm + 2, 0] = limbs[:, arm, 0]
        other = 1 - arm
        limbs[:, other + 2, 0] = limbs[:, other, 0] + 15 * deg
        limbs[:, other + 2, 1] = limbs[:, other, 1]
        limbs[:, 6:8, :] = limbs[:, 4:6, :]
    elif kind == "squat":
        s = (1 - np.cos(phase * 0.7)) / 2 * amp
        limbs[:, 4:6, 0] = (s * 95)[:, None] * deg
        limbs[:, 6:8, 0] = limbs[:, 4:6, 0] - (s * 110)[:, None] * deg
        limbs[:, 4:6, 1] += (s * 10)[:, None] * deg
        limbs[:, 6:8, 1] = limbs[:, 4:6, 1]
        torso[:, 0] += s * 35 * deg
        limbs[:, 0:2, 0] = (s * 85)[:, None] * deg
        limbs[:, 2:4, 0] = limbs[:, 0:2, 0] + (10 * (1 - s))[:, None] * deg
        limbs[:, 2:4, 1] = limbs[:, 0:2, 1]
        yaw[:] = rng.uniform(-1.2, 1.2)
    elif kind == "jacks":
        s = (1 - np.cos(phase)) / 2
        limbs[:, 0:2, 1] = (15 + s * 150 * amp)[:, None] * deg
        limbs[:, 2:4, 1] = limbs[:, 0:2, 1] + (s * 15)[:, None] * deg
        limbs[:, 4:6, 1] = (3 + s * 18 * amp)[:, None] * deg
        limbs[:, 6:8, 1] = limbs[:, 4:6, 1]
        shift[:, 1] = 0.04 * amp * np.abs(np.sin(phase))
        yaw *= 0.5
    elif kind == "bend":
        s = (1 - np.cos(phase * 0.6)) / 2 * amp
        torso[:, 0] += s * 80 * deg
        limbs[:, 4:6, 0] = (-s * 8)[:, None] * deg
        limbs[:, 6:8, 0] = limbs[:, 4:6, 0]
        limbs[:, 0:2, 0] = (s * 25)[:, None] * deg
        limbs[:, 2:4, 0] = limbs[:, 0:2, 0] + 10 * deg
        limbs[:, 2:4, 1] = limbs[:, 0:2, 1]
        yaw[:] = rng.choice([-1, 1]) * rng.uniform(0.5, 1.5)
    elif kind == "random":
        n = _smooth_noise(rng, t, 12, periods=(30, 110)) * amp
        limbs[:, 0:2, 0] = (20 + 60 * n[:, 0:2]) * deg
        limbs[:, 0:2, 1] = (40 + 55 * n[:, 2:4]) * deg
        limbs[:, 2:4, 0] = limbs[:, 0:2, 0] + (45 + 45 * n[:, 4:6]) * deg
        limbs[:, 2:4, 1] = limbs[:, 0:2, 1] * (0.7 + 0.3 * n[:, 6:8])
        limbs[:, 4:6, 0] = (10 + 25 * n[:, 8:10]) * deg
        limbs[:, 6:8, 0] = limbs[:, 4:6, 0] - (20 + 20 * n[:, 10:12]) * deg
        limbs[:, 6:8, 1] = limbs[:, 4:6, 1]
        torso[:, 0] += 12 * deg * (1 + n[:, 0])
        torso[:, 1] = 8 * deg * n[:, 1]
        yaw = yaw + 0.5 * n[:, 2]
    else:
        raise ValueError(f"unknown motion {kind!r}; expected one of {MOTIONS}")
    if kind != "random":
        limbs += sway
    return Pose(limbs, torso, yaw, shift)
