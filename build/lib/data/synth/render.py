"""Rasterising synthetic persons: one static scene per person, one fixed camera per video.

Frames are drawn at 2x and area-downsampled (limbs of 2-3 px break up at 64x64
without anti-aliasing). Every clothing part warps its texture tile into the
limb's own frame, so clothes move with the limb; parts are drawn far to near
for self-occlusion. Everything that is not the person (scene, camera, optional
occluder, colour response, blur, sensor noise) is fixed for a whole video, so
pixels away from the person are identical across a video's frames: the
self-supervised task can only explain the target through the body.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .body import Pose, joints_3d
from .look import Look, Shift, scene_color, shade, texture

SUPER = 2  # supersampling factor
FX = 8  # fixed-point bits for sub-pixel OpenCV drawing (shift=3)
OCCLUDER_PROB = 0.3


@dataclass
class Person:
    """A person's look, motion style and static scene, with texture tiles ready to warp."""

    person_id: str
    split: str
    look: Look
    style: dict
    shift: Shift
    scene: np.ndarray  # (h, w, 3) uint8 RGB at the 2x render scale
    scene_family: str
    ground: float  # scene row the person stands on
    height: float  # standing height in scene pixels
    tiles: dict


def make_tiles(look: Look, ppu: float) -> dict:
    """uint8 tiles (rows along a limb, columns across) for every part kind; ppu = pixels per body height."""
    b = look.body

    def cloth(g, length, radius):
        h, w = max(int((length + 2 * radius) * ppu), 4), max(int(2 * radius * ppu), 4)
        return shade(texture(g, h, w, ppu))

    def solid(color):
        return shade(np.broadcast_to(color, (8, 16, 3)).astype(np.float64))

    return {
        "torso": cloth(look.shirt, b["torso"], b["shoulder"] + b["w_upper_arm"] / 2),
        "uarm": cloth(look.shirt, b["upper_arm"], b["w_upper_arm"] / 2),
        "farm": cloth(look.shirt, b["forearm"], b["w_forearm"] / 2),
        "thigh": cloth(look.pants, b["thigh"], b["w_thigh"] / 2),
        "shin": cloth(look.pants, b["shin"], b["w_shin"] / 2),
        "dress": cloth(look.shirt, b["thigh"], b["hip"] + b["w_thigh"]),
        "skin": solid(look.skin),
        "shoes": solid(look.shoes),
        "hair": solid(look.hair_color),
    }


def _part(canvas: np.ndarray, p0, p1, r0: float, r1: float, tile: np.ndarray, caps: bool = True) -> None:
    """Fill a tapered capsule p0 -> p1 (radii r0, r1 px) with `tile` warped into the limb's frame."""
    hgt, wid = canvas.shape[:2]
    rad = max(r0, r1)
    x0, y0 = int(max(min(p0[0], p1[0]) - rad - 1, 0)), int(max(min(p0[1], p1[1]) - rad - 1, 0))
    x1, y1 = int(min(max(p0[0], p1[0]) + rad + 2, wid)), int(min(max(p0[1], p1[1]) + rad + 2, hgt))
    if x1 <= x0 or y1 <= y0 or rad < 0.5:
        return
    d = (p1[0] - p0[0], p1[1] - p0[1])
    length = float(np.hypot(*d))
    e = (d[0] / length, d[1] / length) if length > 1e-6 else (0.0, 1.0)
    n = (-e[1], e[0])
    a0 = (p0[0] - x0, p0[1] - y0)
    a1 = (p1[0] - x0, p1[1] - y0)
    quad = np.array([[a0[0] + n[0] * r0, a0[1] + n[1] * r0], [a1[0] + n[0] * r1, a1[1] + n[1] * r1],
                     [a1[0] - n[0] * r1, a1[1] - n[1] * r1], [a0[0] - n[0] * r0, a0[1] - n[1] * r0]])
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.fillConvexPoly(mask, np.round(quad * FX).astype(np.int32), 255, cv2.LINE_8, 3)
    if caps:
        cv2.circle(mask, (round(a0[0] * FX), round(a0[1] * FX)), round(r0 * FX), 255, -1, cv2.LINE_8, 3)
        cv2.circle(mask, (round(a1[0] * FX), round(a1[1] * FX)), round(r1 * FX), 255, -1, cv2.LINE_8, 3)
    th, tw = tile.shape[:2]
    su, sv = (length + 2 * rad) / th, 2 * rad / tw
    m = np.array([[n[0] * sv, e[0] * su, a0[0] - (e[0] + n[0]) * rad],
                  [n[1] * sv, e[1] * su, a0[1] - (e[1] + n[1]) * rad]])
    warped = cv2.warpAffine(tile, m, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    cv2.copyTo(warped, mask, canvas[y0:y1, x0:x1])


def _pt(p) -> tuple[int, int]:
    return round(p[0] * FX), round(p[1] * FX)


def _ellipse(canvas, c, axes, angle, color, start=0, end=360) -> None:
    cv2.ellipse(canvas, _pt(c), (max(round(axes[0] * FX), 1), max(round(axes[1] * FX), 1)), angle, start, end,
                tuple(float(v) for v in color), -1, cv2.LINE_8, 3)


def _head(canvas, c, r: float, up, yaw: float, look: Look) -> None:
    """Head ellipse tilted with the neck, hair/hat/hood, and eyes when the face is towards the camera."""
    right = np.array([-up[1], up[0]])
    angle = float(np.degrees(np.arctan2(right[1], right[0])))
    facing = np.cos(yaw)
    hair = look.hair
    if hair == "hood":
        _ellipse(canvas, c + up * 0.08 * r, (1.12 * r, 1.18 * r), angle, look.shirt.colors[0])
    _ellipse(canvas, c, (0.86 * r, r), angle, look.skin)
    back = right * np.sin(yaw)  # towards the back of the head in the image
    if hair in ("short", "long"):
        if facing < -0.2:
            _ellipse(canvas, c - up * 0.0, (0.92 * r, 1.04 * r), angle, look.hair_color)
        else:
            _ellipse(canvas, c + up * 0.3 * r + back * 0.3 * r, (0.9 * r, 0.78 * r), angle, look.hair_color)
    elif hair == "hat":
        _ellipse(canvas, c + up * 0.3 * r, (0.95 * r, 0.85 * r), angle, look.pants.colors[1], 180, 360)
        cv2.line(canvas, _pt(c + up * 0.3 * r - right * 1.25 * r), _pt(c + up * 0.3 * r + right * 1.25 * r),
                 tuple(float(v) for v in look.pants.colors[1]), max(round(0.22 * r), 1), cv2.LINE_8, 3)
    if facing > 0.15:
        for side in (-1, 1):
            x, z = side * 0.36 * r, -0.85 * r
            ex = np.cos(yaw) * x + np.sin(yaw) * z
            ez = -np.sin(yaw) * x + np.cos(yaw) * z
            if ez < -0.3 * r:
                cv2.circle(canvas, _pt(c + right * ex - up * 0.05 * r), max(round(0.13 * r * FX), FX),
                           (25, 20, 20), -1, cv2.LINE_8, 3)


@dataclass
class VideoView:
    """Everything fixed within one video: background, camera, occluder, colour response, blur and noise."""

    size: int
    background: np.ndarray  # (2S, 2S, 3) uint8
    origin: np.ndarray  # 2x pixels of the person's ground point at zero root shift
    scale: float  # 2x pixels per body height
    occluder: tuple | None  # (y0, y1, x0, x1, mask bool ROI, colour ROI)
    lut: np.ndarray
    blur: float
    noise: tuple[np.ndarray, np.ndarray] | None  # (add, subtract) uint8


def make_view(person: Person, size: int, rng: np.random.Generator) -> VideoView:
    """A camera window on the person's scene (zoom and position vary between videos) and the video's extras."""
    s2 = size * SUPER
    sh, sw = person.scene.shape[:2]
    zoom = min(rng.uniform(0.8, 1.25), 0.85 * s2 / person.height)
    win = s2 / zoom
    g = rng.uniform(min(person.height * zoom / s2 + 0.07, 0.95), 0.97)  # ground's row as a fraction of the frame
    y0 = float(np.clip(person.ground - g * win, 0, sh - win))
    x0 = rng.uniform(0, sw - win)
    cam = np.array([[zoom, 0, -zoom * x0], [0, zoom, -zoom * y0]])
    background = cv2.warpAffine(person.scene, cam, (s2, s2), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    origin = np.array([rng.uniform(0.38, 0.62) * s2, zoom * (person.ground - y0)])
    scale = person.height * zoom
    occluder = _occluder(rng, s2, origin, scale, person.shift.background) if rng.random() < OCCLUDER_PROB else None
    gain, gamma = rng.uniform(0.85, 1.15), rng.uniform(0.85, 1.15)
    cast = rng.uniform(0.95, 1.05, 3)
    x = np.arange(256) / 255.0
    lut = np.clip(255 * gain * cast[None, :] * (x[:, None] ** gamma), 0, 255).astype(np.uint8).reshape(1, 256, 3)
    blur = rng.uniform(0.3, 0.7) if rng.random() < 0.4 else 0.0
    sigma = rng.uniform(0, 5)
    noise = None
    if sigma > 0.5:
        n = rng.normal(0, sigma, (size, size, 3))
        noise = (np.clip(n, 0, 255).astype(np.uint8), np.clip(-n, 0, 255).astype(np.uint8))
    return VideoView(size, background, origin, scale, occluder, lut, blur, noise)


def _occluder(rng: np.random.Generator, s2: int, origin, scale: float, strength: float):
    """A static foreground object near the person's path (pole, box, bush or sign)."""
    mask = np.zeros((s2, s2), np.uint8)
    cx, gy = origin[0] + rng.uniform(-0.3, 0.3) * scale, origin[1]
    kind = rng.choice(["pole", "box", "bush", "sign"])
    if kind in ("pole", "sign"):
        w = rng.uniform(0.03, 0.08) * scale
        cv2.rectangle(mask, (int(cx - w / 2), 0 if kind == "pole" else int(gy - 0.9 * scale)),
                      (int(cx + w / 2), s2), 255, -1)
        if kind == "sign":
            pw, ph = rng.uniform(0.25, 0.45) * scale, rng.uniform(0.15, 0.3) * scale
            top = gy - rng.uniform(0.6, 0.9) * scale
            cv2.rectangle(mask, (int(cx - pw / 2), int(top)), (int(cx + pw / 2), int(top + ph)), 255, -1)
    elif kind == "box":
        w, h = rng.uniform(0.25, 0.55) * scale, rng.uniform(0.2, 0.45) * scale
        cv2.rectangle(mask, (int(cx - w / 2), int(gy + 0.03 * scale - h)), (int(cx + w / 2), s2), 255, -1)
    else:
        for _ in range(int(rng.integers(3, 7))):
            cv2.circle(mask, (int(cx + rng.normal(0, 0.12) * scale), int(gy - rng.uniform(0, 0.2) * scale)),
                       int(rng.uniform(0.08, 0.16) * scale), 255, -1)
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    base = scene_color(rng, strength)
    yy = np.linspace(0, 1, y1 - y0)[:, None, None]
    color = np.clip(base * (0.8 + 0.3 * yy) * np.ones((1, x1 - x0, 1)), 0, 255).astype(np.uint8)
    return int(y0), int(y1), int(x0), int(x1), mask[y0:y1, x0:x1] > 0, color


def render_video(person: Person, view: VideoView, pose: Pose) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(image HxWx3 uint8 RGB, keypoints (13, 3) [x, y, visible], bbox (4,)) for every frame of `pose`."""
    j3, extra3 = joints_3d(pose, person.look.body)
    out = []
    for t in range(len(pose.yaw)):
        out.append(_frame(person, view, j3[t], extra3[t], float(pose.yaw[t])))
    return out


def _frame(person: Person, view: VideoView, j3: np.ndarray, x3: np.ndarray, yaw: float):
    look, b, tiles = person.look, person.look.body, person.tiles
    s = view.scale
    p = view.origin + j3[:, :2] * s  # 2x pixels
    q = view.origin + x3[:, :2] * s  # neck top, toes, pelvis
    z = j3[:, 2]
    canvas = view.background.copy()
    _shadow(canvas, np.array([(p[11, 0] + p[12, 0]) / 2, view.origin[1]]), 0.22 * s, 0.035 * s)
    w = {k: b[k] * s / 2 for k in ("w_upper_arm", "w_forearm", "w_thigh", "w_shin", "w_neck")}
    torso_z = (z[1] + z[2] + z[7] + z[8]) / 4 - 0.02
    chest, pelvis = (p[1] + p[2]) / 2, (p[7] + p[8]) / 2
    top_r = max(np.hypot(*(p[1] - p[2])) / 2 + w["w_upper_arm"] * 0.9, b["chest"] * s / 2)
    bot_r = max(np.hypot(*(p[7] - p[8])) / 2 + w["w_thigh"], b["chest"] * s * 0.45)
    axis = pelvis - chest
    axis_n = axis / max(np.hypot(*axis), 1e-6)
    parts = [  # (depth, draw)
        (torso_z, lambda c: _part(c, chest - axis_n * w["w_upper_arm"] * 0.5, pelvis + axis_n * w["w_thigh"] * 0.4,
                                  top_r, bot_r, tiles["torso"], caps=False)),
        (torso_z + 0.005, lambda c: _part(c, q[0], chest, w["w_neck"], w["w_neck"], tiles["skin"])),
    ]
    head_up = (p[0] - q[0]) / max(np.hypot(*(p[0] - q[0])), 1e-6)
    head_r = b["head_r"] * s
    parts.append((z[0] - 0.03, lambda c: _head(c, p[0], head_r, head_up, yaw, look)))
    if look.hair == "long":
        hz = z[0] + np.cos(yaw) * b["chest"] * 0.6
        parts.append((hz, lambda c: _part(c, p[0], p[0] - head_up * 1.7 * head_r, 0.95 * head_r, 0.8 * head_r,
                                          tiles["hair"])))
    sleeve = {"long": (1.0, 1.0), "short": (0.55, 0.0), "none": (0.0, 0.0)}[look.sleeves]
    for side in (0, 1):
        sh, el, wr, hp, kn, an = 1 + side, 3 + side, 5 + side, 7 + side, 9 + side, 11 + side
        parts += _limb(p[sh], p[el], w["w_upper_arm"], w["w_upper_arm"] * 0.88, (z[sh] + z[el]) / 2, tiles["uarm"],
                       tiles["skin"], sleeve[0])
        parts += _limb(p[el], p[wr], w["w_forearm"], w["w_forearm"] * 0.85, (z[el] + z[wr]) / 2, tiles["farm"],
                       tiles["skin"], sleeve[1])
        fd = (p[wr] - p[el]) / max(np.hypot(*(p[wr] - p[el])), 1e-6)
        hand = p[wr] + fd * b["hand"] * s * 0.7
        parts.append((z[wr] - 0.001, lambda c, a=p[wr], h=hand: _part(c, a, h, w["w_forearm"] * 1.05,
                                                                        w["w_forearm"] * 0.9, tiles["skin"])))
        cover = {"trousers": (1.0, 1.0), "shorts": (0.65, 0.0), "dress": (0.0, 0.0)}[look.legs]
        parts += _limb(p[hp], p[kn], w["w_thigh"], w["w_thigh"] * 0.85, (z[hp] + z[kn]) / 2, tiles["thigh"],
                       tiles["skin"], cover[0])
        parts += _limb(p[kn], p[an], w["w_shin"], w["w_shin"] * 0.8, (z[kn] + z[an]) / 2, tiles["shin"],
                       tiles["skin"], cover[1])
        parts.append((z[an] - 0.002, lambda c, a=p[an], t=q[1 + side]: _part(
            c, a, t, w["w_shin"] * 0.75, w["w_shin"] * 0.6, tiles["shoes"])))
    if look.legs == "dress":
        knees = (p[9] + p[10]) / 2
        parts.append((torso_z - 0.01, lambda c: _part(c, pelvis, pelvis + (knees - pelvis) * 0.95, bot_r,
                                                      bot_r * 1.3, tiles["dress"], caps=False)))
    parts.sort(key=lambda dp: -dp[0])
    for _, draw in parts:
        draw(canvas)
    if view.occluder is not None:
        y0, y1, x0, x1, m, col = view.occluder
        np.copyto(canvas[y0:y1, x0:x1], col, where=m[..., None])
    image = cv2.resize(canvas, (view.size, view.size), interpolation=cv2.INTER_AREA)
    image = cv2.LUT(image, view.lut)
    if view.blur:
        image = cv2.GaussianBlur(image, (0, 0), view.blur)
    if view.noise is not None:
        image = cv2.subtract(cv2.add(image, view.noise[0]), view.noise[1])
    return image, *_labels(p, view, head_r)


def _limb(a, b, r0, r1, depth, cloth_tile, skin_tile, covered: float) -> list:
    """A limb of skin with clothing over the first `covered` fraction of it (1 = fully clothed)."""
    out = []
    if covered < 1.0:
        out.append((depth, lambda c: _part(c, a, b, r0, r1, skin_tile)))
    if covered > 0.0:
        end = a + (b - a) * covered
        grow = 1.0 if covered == 1.0 else 1.12
        out.append((depth - 1e-4, lambda c: _part(c, a, end, r0 * grow, (r0 + (r1 - r0) * covered) * grow,
                                                  cloth_tile)))
    return out


def _shadow(canvas, center, rx: float, ry: float) -> None:
    x0, x1 = int(max(center[0] - rx, 0)), int(min(center[0] + rx + 1, canvas.shape[1]))
    y0, y1 = int(max(center[1] - ry, 0)), int(min(center[1] + ry + 1, canvas.shape[0]))
    if x1 <= x0 or y1 <= y0:
        return
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.ellipse(mask, _pt((center[0] - x0, center[1] - y0)), (max(round(rx * FX), 1), max(round(ry * FX), 1)), 0, 0,
                360, 255, -1, cv2.LINE_8, 3)
    roi = canvas[y0:y1, x0:x1]
    np.copyto(roi, (roi * 0.7).astype(np.uint8), where=mask[..., None] > 0)


def _labels(p: np.ndarray, view: VideoView, head_r: float) -> tuple[np.ndarray, np.ndarray]:
    """Keypoints at output resolution (visible = inside the frame and not behind the occluder) and the person box."""
    size = view.size
    xy = (p - (SUPER - 1) / 2) / SUPER  # 2x pixel centres -> output pixel centres
    vis = (xy[:, 0] >= 0) & (xy[:, 0] <= size - 1) & (xy[:, 1] >= 0) & (xy[:, 1] <= size - 1)
    if view.occluder is not None:
        y0, y1, x0, x1, m, _ = view.occluder
        ix, iy = np.round(p[:, 0]).astype(int) - x0, np.round(p[:, 1]).astype(int) - y0
        inside = (ix >= 0) & (ix < x1 - x0) & (iy >= 0) & (iy < y1 - y0)
        hidden = np.zeros(len(p), bool)
        hidden[inside] = m[iy[inside], ix[inside]]
        vis &= ~hidden
    ref = xy[vis] if vis.sum() >= 2 else xy
    lo, hi = ref.min(axis=0), ref.max(axis=0)
    pad = max(0.06 * float((hi - lo).max()), head_r / SUPER)
    lo = np.clip(lo - pad, 0, size - 1)
    hi = np.clip(hi + pad, 0, size - 1)
    bbox = np.array([lo[0], lo[1], max(hi[0] - lo[0], 1.0), max(hi[1] - lo[1], 1.0)], np.float32)
    return np.concatenate([xy, vis[:, None]], axis=1).astype(np.float32), bbox
