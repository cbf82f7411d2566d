"""Appearance of synthetic persons and their scenes, and the train -> test appearance shift.

Test persons differ from training persons only in how they look (never in
motion, camera or pose statistics), so a gap between them is a per-person
domain shift that the person's own unlabeled frames can teach. The shift has
three components, each a strength in [0, 1] (0 = the training distribution,
1 = fully shifted):

- clothing: each garment's texture family (train: solid, stripes, checks, dots;
  shifted: zigzag, camo, rings, diamonds) comes from the shifted set with
  probability = strength, and its cut (shifted: sleeveless tops, knee-length
  dresses that hide the thighs) with probability 0.4 x strength; garment colours
  are interpolated from the training palette (muted, hues near 0/60/120/.. deg)
  to the shifted one (saturated, hues near 30/90/150/.. deg).
- body: proportions are interpolated (geometrically) towards a shifted body type
  (child-like: big head, short legs; heavy; lanky); hair colour from natural to
  dyed; with probability 0.6 x strength the hair becomes a hat or a hood.
- background: the scene family (train: room, park, street; shifted: abstract
  shapes, night, patterned walls) is shifted with probability = strength;
  scene colours are interpolated to the shifted palette and the amount of
  clutter grows.
Skin tones come from the same range in every split. A person's random draws do
not depend on the strengths, so one person can be rendered at several shifts.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

TRAIN_TEXTURES = ("solid", "stripes", "checks", "dots")
SHIFT_TEXTURES = ("zigzag", "camo", "rings", "diamonds")
TRAIN_SCENES = ("room", "park", "street")
SHIFT_SCENES = ("abstract", "night", "pattern")
TRAIN_HAIR = ("short", "long", "bald")
SHIFT_HAIR = ("hat", "hood")

SKIN_RAMP = np.array([[244, 210, 186], [222, 176, 142], [186, 134, 98], [140, 94, 64], [92, 60, 42]], np.float64)
HAIR_NATURAL = np.array([[28, 22, 20], [62, 42, 28], [112, 76, 46], [205, 172, 112], [135, 62, 32], [165, 160, 155]],
                        np.float64)
HAIR_DYED = np.array([[40, 90, 225], [240, 80, 175], [60, 205, 90], [150, 60, 210], [250, 140, 20]], np.float64)
# Body-type multipliers (1 = nominal) that the body shift moves towards.
BODY_TYPES = {
    "child": {"head_r": 1.35, "thigh": 0.85, "shin": 0.85, "upper_arm": 0.88, "forearm": 0.88, "torso": 0.95},
    "heavy": {"w_upper_arm": 1.55, "w_forearm": 1.45, "w_thigh": 1.6, "w_shin": 1.4, "chest": 1.6, "hip": 1.35,
              "shoulder": 1.15},
    "lanky": {"upper_arm": 1.12, "forearm": 1.12, "thigh": 1.12, "shin": 1.15, "w_upper_arm": 0.72,
              "w_forearm": 0.72, "w_thigh": 0.72, "w_shin": 0.72, "chest": 0.8},
}


@dataclass(frozen=True)
class Shift:
    """Per-component appearance shift strengths in [0, 1] (see the module docstring)."""

    clothing: float = 0.0
    body: float = 0.0
    background: float = 0.0

    @classmethod
    def from_strength(cls, strength: float, profile: "Shift | None" = None) -> "Shift":
        """The one-number knob of `posettp synth --shift`: `strength` times a per-component profile."""
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"shift must be in [0, 1], got {strength}")
        p = profile or SHIFT_PROFILE
        return cls(p.clothing * strength, p.body * strength, p.background * strength)

    @classmethod
    def profile_of(cls, components: str) -> "Shift":
        """`clothing,background` -> Shift(clothing=1, body=0, background=1): the profile of
        `posettp synth --shift-components`."""
        names = {c.strip() for c in components.split(",") if c.strip()}
        unknown = names - set(cls.__dataclass_fields__)
        if unknown or not names:
            raise ValueError(f"shift components must come from {list(cls.__dataclass_fields__)}, got {components!r}")
        return cls(**{c: float(c in names) for c in cls.__dataclass_fields__})

    def as_dict(self) -> dict:
        return asdict(self)


SHIFT_PROFILE = Shift(clothing=1.0, body=1.0, background=1.0)


def hsv(h: float, s: float, v: float) -> np.ndarray:
    """Hue in degrees, s and v in [0, 1] -> RGB floats 0..255."""
    c = cv2.cvtColor(np.array([[[h / 2 % 180, s * 255, v * 255]]], np.float32).astype(np.uint8), cv2.COLOR_HSV2RGB)
    return c[0, 0].astype(np.float64)


def _pick(rng: np.random.Generator, train: tuple, shifted: tuple, strength: float, p_train=None) -> str:
    """From `shifted` with probability `strength`, else from `train` (weights `p_train`).

    Always draws two uniforms, so what a person's other attributes come out as does not
    depend on the strength: the same person can be rendered at several shifts.
    """
    use_shifted, u = rng.random() < strength, rng.random()
    if use_shifted:
        return shifted[int(u * len(shifted))]
    cum = np.cumsum(p_train if p_train is not None else np.full(len(train), 1 / len(train)))
    return train[min(int(np.searchsorted(cum, u * cum[-1], side="right")), len(train) - 1)]


def cloth_color(rng: np.random.Generator, strength: float) -> np.ndarray:
    """Muted colours on even 60-degree hue sectors, interpolated to saturated ones on the odd sectors."""
    base = rng.integers(6) * 60.0
    train = hsv(base + rng.uniform(-15, 15), rng.uniform(0.25, 0.7), rng.uniform(0.3, 0.85))
    shifted = hsv(base + 30 + rng.uniform(-12, 12), rng.uniform(0.85, 1.0), rng.uniform(0.85, 1.0))
    return (1 - strength) * train + strength * shifted


def scene_color(rng: np.random.Generator, strength: float) -> np.ndarray:
    train = hsv(rng.uniform(0, 360), rng.uniform(0.05, 0.4), rng.uniform(0.35, 0.85))
    shifted = hsv(rng.uniform(0, 360), rng.uniform(0.7, 1.0), rng.choice([rng.uniform(0.08, 0.25),
                                                                           rng.uniform(0.85, 1.0)]))
    return (1 - strength) * train + strength * shifted


@dataclass
class Garment:
    family: str
    colors: np.ndarray  # (3, 3) RGB
    period: float  # pattern period in body heights
    angle: float  # radians
    seed: int


def make_garment(rng: np.random.Generator, strength: float) -> Garment:
    colors = np.stack([cloth_color(rng, strength) for _ in range(3)])
    return Garment(_pick(rng, TRAIN_TEXTURES, SHIFT_TEXTURES, strength), colors, rng.uniform(0.025, 0.06),
                   float(rng.choice([0.0, np.pi / 2, np.pi / 4, -np.pi / 4])), int(rng.integers(2**31)))


def texture(g: Garment, h: int, w: int, ppu: float, family: str | None = None) -> np.ndarray:
    """(h, w, 3) float RGB tile of garment `g`: rows run along a limb, columns across it.

    `ppu` (pixels per body height) keeps the pattern's period the same on every part of a garment.
    """
    fam = family or g.family
    rng = np.random.default_rng(g.seed + h * 7919 + w)
    p = max(g.period * ppu, 3.0)
    u, v = np.mgrid[0:h, 0:w].astype(np.float64)
    c0, c1, c2 = g.colors
    if fam == "solid":
        idx = np.zeros((h, w), np.int64)
    elif fam == "stripes":
        idx = (np.floor((u * np.cos(g.angle) + v * np.sin(g.angle)) / (p / 2)) % 2).astype(np.int64)
    elif fam == "checks":
        idx = ((np.floor(u / (p / 2)) + np.floor(v / (p / 2))) % 2).astype(np.int64)
    elif fam == "dots":
        du, dv = (u % p) - p / 2, (v % p) - p / 2
        idx = (du * du + dv * dv < (p * 0.28) ** 2).astype(np.int64)
    elif fam == "zigzag":
        tri = np.abs((v / p) % 1.0 - 0.5) * p
        idx = (np.floor((u + tri) / (p / 3)) % 3).astype(np.int64)
    elif fam == "camo":
        small = rng.random((max(h // int(p) + 2, 2), max(w // int(p) + 2, 2)))
        n = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
        idx = np.digitize(n, [0.38, 0.62])
    elif fam == "rings":
        cu, cv_ = rng.uniform(0, h), rng.uniform(0, w)
        idx = (np.floor(np.hypot(u - cu, v - cv_) / (p / 3)) % 3).astype(np.int64)
    elif fam == "diamonds":
        d = np.abs((u / p) % 1.0 - 0.5) + np.abs((v / p) % 1.0 - 0.5)
        idx = np.where(d < 0.22, 1, np.where(np.abs(d - 0.36) < 0.04, 2, 0))
    else:
        raise ValueError(f"unknown texture family {fam!r}")
    return np.stack([c0, c1, c2])[idx]


def shade(tile: np.ndarray) -> np.ndarray:
    """Darken towards the edges across a limb (columns) so limbs read as round; returns uint8."""
    w = tile.shape[1]
    x = (np.arange(w) + 0.5) / w * 2 - 1
    prof = 0.72 + 0.28 * np.sqrt(np.clip(1 - x * x, 0, 1)) + 0.06 * -x
    return np.clip(tile * prof[None, :, None], 0, 255).astype(np.uint8)


@dataclass
class Look:
    """Everything about how one person looks (not how they move)."""

    body: dict  # proportions in body heights (body.NOMINAL keys)
    skin: np.ndarray
    hair_color: np.ndarray
    hair: str
    shirt: Garment
    pants: Garment
    shoes: np.ndarray
    sleeves: str  # long | short | none
    legs: str  # trousers | shorts | dress
    body_type: str  # the shifted body type this person moves towards as the body shift grows


def make_look(rng: np.random.Generator, nominal: dict, shift: Shift) -> Look:
    b = {k: v * float(np.exp(rng.normal(0, 0.05))) for k, v in nominal.items()}
    width = rng.uniform(0.85, 1.2)
    for k in b:
        if k.startswith("w_") or k == "chest":
            b[k] *= width
    b["head_r"] *= rng.uniform(0.92, 1.08)
    body_type = sorted(BODY_TYPES)[int(rng.integers(len(BODY_TYPES)))]
    for k, m in BODY_TYPES[body_type].items():
        b[k] *= m ** shift.body
    t = rng.uniform(0, len(SKIN_RAMP) - 1)
    i = int(min(t, len(SKIN_RAMP) - 2))
    skin = SKIN_RAMP[i] + (SKIN_RAMP[i + 1] - SKIN_RAMP[i]) * (t - i)
    hair_color = ((1 - shift.body) * HAIR_NATURAL[rng.integers(len(HAIR_NATURAL))]
                  + shift.body * HAIR_DYED[rng.integers(len(HAIR_DYED))])
    hair = _pick(rng, TRAIN_HAIR, SHIFT_HAIR, shift.body * 0.6, p_train=[0.5, 0.4, 0.1])
    shirt, pants = make_garment(rng, shift.clothing), make_garment(rng, shift.clothing)
    pants.colors = pants.colors * 0.8  # trousers a little darker than tops, as usual
    sleeves = _pick(rng, ("long", "short"), ("none",), shift.clothing * 0.4)
    legs = _pick(rng, ("trousers", "shorts"), ("dress",), shift.clothing * 0.4, p_train=[0.7, 0.3])
    shoes = hsv(rng.uniform(0, 360), rng.uniform(0, 0.5), rng.uniform(0.1, 0.5))
    return Look(b, skin, hair_color, hair, shirt, pants, shoes, sleeves, legs, body_type)


def _grain(rng: np.random.Generator, h: int, w: int, sigma: float) -> np.ndarray:
    """Fine static grain so that flat scene regions are not perfectly flat."""
    return cv2.GaussianBlur(rng.normal(0, sigma, (h, w)), (0, 0), 0.8)[..., None]


def make_scene(rng: np.random.Generator, h: int, w: int, ground: float, strength: float) -> tuple[np.ndarray, str]:
    """A static scene (h, w, 3) uint8 RGB whose floor/ground is below row `ground`; returns (image, family)."""
    family = _pick(rng, TRAIN_SCENES, SHIFT_SCENES, strength)
    col = lambda: scene_color(rng, strength)  # noqa: E731
    img = np.zeros((h, w, 3), np.float64)
    horizon = int(ground - rng.uniform(0.08, 0.3) * h)
    n_clutter = int(round(rng.uniform(6, 14) * (1 + 1.5 * strength)))
    ys = np.arange(h)[:, None, None]
    if family in ("room", "pattern"):
        img[:] = col()
        img *= 1.0 + 0.12 * (ys / h - 0.5)
        if family == "pattern":
            g = make_garment(rng, 1.0)
            g.period *= 3
            img[:horizon] = texture(g, horizon, w, 0.45 * h, family=str(rng.choice(SHIFT_TEXTURES)))
        floor = col()
        img[horizon:] = floor
        for x in range(int(rng.uniform(0, 40)), w, int(rng.uniform(25, 60))):
            cv2.line(img, (x, horizon), (int(x + (x - w / 2) * 0.6), h), tuple(floor * 0.8), 1)
        for _ in range(n_clutter):
            x0, y0 = rng.uniform(0, w), rng.uniform(0.05 * h, horizon)
            bw, bh = rng.uniform(0.04, 0.25) * w, rng.uniform(0.05, 0.35) * h
            c = col()
            if rng.random() < 0.5:  # picture frame / window
                cv2.rectangle(img, (int(x0), int(y0)), (int(x0 + bw), int(y0 + bh)), tuple(c), -1)
                cv2.rectangle(img, (int(x0), int(y0)), (int(x0 + bw), int(y0 + bh)), tuple(c * 0.5), 2)
            else:  # furniture standing on the floor
                yb = horizon + rng.uniform(0, 0.1) * h
                cv2.rectangle(img, (int(x0), int(yb - bh)), (int(x0 + bw), int(yb)), tuple(c), -1)
                cv2.rectangle(img, (int(x0), int(yb - bh)), (int(x0 + bw), int(yb)), tuple(c * 0.6), 2)
    elif family == "park":
        sky, grass = hsv(rng.uniform(190, 220), rng.uniform(0.2, 0.5), rng.uniform(0.75, 0.95)), col()
        grass = (1 - strength) * hsv(rng.uniform(80, 130), rng.uniform(0.3, 0.6), rng.uniform(0.35, 0.65)) \
            + strength * grass
        img[:horizon] = sky * (0.85 + 0.15 * ys[:horizon] / max(horizon, 1))
        img[horizon:] = grass
        for _ in range(n_clutter):
            x0, base = rng.uniform(0, w), horizon + rng.uniform(-0.02, 0.06) * h
            th = rng.uniform(0.15, 0.45) * h
            trunk = hsv(rng.uniform(20, 40), 0.5, rng.uniform(0.2, 0.4))
            cv2.rectangle(img, (int(x0 - th * 0.04), int(base - th)), (int(x0 + th * 0.04), int(base)), tuple(trunk),
                          -1)
            leaf = (1 - strength) * hsv(rng.uniform(70, 140), rng.uniform(0.4, 0.8), rng.uniform(0.25, 0.6)) \
                + strength * col()
            for _ in range(4):
                cv2.circle(img, (int(x0 + rng.normal(0, th * 0.12)), int(base - th + rng.normal(0, th * 0.1))),
                           int(th * rng.uniform(0.15, 0.3)), tuple(leaf * rng.uniform(0.85, 1.15)), -1)
    elif family in ("street", "night"):
        dark = family == "night"
        sky = hsv(rng.uniform(200, 240), 0.6, 0.12) if dark else hsv(rng.uniform(190, 220), 0.3, 0.9)
        img[:horizon] = sky
        img[horizon:] = hsv(0, 0, 0.15) if dark else hsv(0, 0, rng.uniform(0.4, 0.6))
        x = 0.0
        while x < w:
            bw, bh = rng.uniform(0.12, 0.3) * w, rng.uniform(0.25, 0.7) * h
            c = col() * (0.4 if dark else 1.0)
            cv2.rectangle(img, (int(x), int(horizon - bh)), (int(x + bw), horizon), tuple(c), -1)
            win = col() if dark else c * 0.6
            for wy in np.arange(horizon - bh + 8, horizon - 12, rng.uniform(14, 24)):
                for wx in np.arange(x + 6, x + bw - 10, rng.uniform(12, 20)):
                    if not dark or rng.random() < 0.5:
                        cv2.rectangle(img, (int(wx), int(wy)), (int(wx + 6), int(wy + 8)), tuple(win), -1)
            x += bw + rng.uniform(0, 0.05) * w
        if dark:
            for _ in range(n_clutter):
                c = col()
                cv2.circle(img, (int(rng.uniform(0, w)), int(rng.uniform(0, h))), int(rng.uniform(3, 12)),
                           tuple(np.maximum(c, 160)), -1)
    else:  # abstract
        img[:] = col()
        for _ in range(n_clutter * 2):
            pts = (rng.uniform(0, 1, (int(rng.integers(3, 6)), 2)) * [w * 0.3, h * 0.3]
                   + [rng.uniform(-0.1, 1) * w, rng.uniform(-0.1, 1) * h]).astype(np.int32)
            cv2.fillPoly(img, [pts], tuple(col()))
        img[horizon:] = img[horizon:] * 0.6 + col() * 0.4
    img += _grain(rng, h, w, 4.0)
    return np.clip(img, 0, 255).astype(np.uint8), family
