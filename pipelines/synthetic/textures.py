"""Procedural textures: the backgrounds and the object skins of the synthetic scenes.

Everything is a pure function of an explicit `np.random.Generator`, computed with a few
vectorised numpy/cv2 calls so a 480p frame's worth of texture costs milliseconds.
"""
from __future__ import annotations

import cv2
import numpy as np

PATTERNS = ("stripes", "checker", "rings", "dots", "noise")


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> np.ndarray:
    """Band-limited noise in [0, 1] of `shape`, with features about `cell` pixels wide.

    Random values on a coarse grid, upsampled bicubically: cheap, and smooth at any size.
    """
    h, w = shape
    grid = (max(2, int(np.ceil(h / cell)) + 1), max(2, int(np.ceil(w / cell)) + 1))
    coarse = rng.random(grid, dtype=np.float32)
    field = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    lo, hi = float(field.min()), float(field.max())
    return (field - lo) / max(hi - lo, 1e-6)


def hsv_colour(hue: float, saturation: float, value: float) -> np.ndarray:
    """One RGB colour (float32, 0..255) from HSV components in [0, 1]."""
    hsv = np.array([[[hue * 180.0, saturation * 255.0, value * 255.0]]], dtype=np.float32)
    hsv = np.clip(hsv, 0, [179.999, 255, 255]).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def pattern_field(rng: np.random.Generator, shape: tuple[int, int], kind: str,
                  period: float) -> np.ndarray:
    """A [0, 1] pattern of the given kind whose repeat is about `period` pixels."""
    h, w = shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    u = x * np.cos(angle) + y * np.sin(angle)
    v = -x * np.sin(angle) + y * np.cos(angle)
    freq = 2 * np.pi / period
    if kind == "stripes":
        field = 0.5 + 0.5 * np.sin(freq * u + rng.uniform(0, 2 * np.pi))
    elif kind == "checker":
        field = (np.sin(freq * u) * np.sin(freq * v) > 0).astype(np.float32)
        field = cv2.GaussianBlur(field, (0, 0), max(period / 12, 0.5))
    elif kind == "rings":
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        field = 0.5 + 0.5 * np.sin(freq * np.hypot(x - cx, y - cy))
    elif kind == "dots":
        field = ((np.sin(freq * u) * np.sin(freq * v)) > 0.55).astype(np.float32)
        field = cv2.GaussianBlur(field, (0, 0), max(period / 10, 0.5))
    elif kind == "noise":
        field = smooth_noise(rng, shape, period / 2)
    else:
        raise ValueError(f"unknown pattern {kind!r}; expected one of {PATTERNS}")
    return field.astype(np.float32)


def object_texture(rng: np.random.Generator, size: int, hue: float) -> np.ndarray:
    """A square RGB skin (float32, 0..255) for one object: two colours of a distinct hue
    mixed by a random pattern, plus fine grain so no region is perfectly flat."""
    pattern = PATTERNS[rng.integers(len(PATTERNS))]
    period = rng.uniform(0.12, 0.4) * size + 2
    mix = pattern_field(rng, (size, size), pattern, period)[..., None]
    first = hsv_colour(hue, rng.uniform(0.6, 1.0), rng.uniform(0.55, 1.0))
    second = hsv_colour((hue + rng.uniform(-0.08, 0.08)) % 1.0, rng.uniform(0.3, 1.0),
                        rng.uniform(0.15, 0.5))
    skin = first * (1 - mix) + second * mix
    grain = (smooth_noise(rng, (size, size), 3.0)[..., None] - 0.5) * 30.0
    return np.clip(skin + grain, 0, 255).astype(np.float32)


def background_texture(rng: np.random.Generator, shape: tuple[int, int],
                       lookalike_hues: tuple[float, ...] = ()) -> np.ndarray:
    """A large RGB canvas (float32, 0..255) for the camera to pan over: muted colour fields
    at several scales, a low-contrast pattern, a few flat shapes, and one textured
    look-alike per hue in `lookalike_hues` (painted into the background, so it moves with
    the camera, not like an object)."""
    h, w = shape
    scale = min(h, w)
    base = np.stack([smooth_noise(rng, shape, scale / 3) for _ in range(3)], axis=-1)
    light = smooth_noise(rng, shape, scale / 6)[..., None]
    detail = smooth_noise(rng, shape, scale / 25)[..., None]
    pattern_kind = PATTERNS[rng.integers(len(PATTERNS))]
    pattern = pattern_field(rng, shape, pattern_kind, rng.uniform(0.04, 0.15) * scale)[..., None]
    tint = hsv_colour(rng.random(), rng.uniform(0.1, 0.4), rng.uniform(0.4, 0.8))
    canvas = (tint + 40.0 * (base - 0.5) + 80.0 * (light - 0.5) + 40.0 * (detail - 0.5)
              + 35.0 * (pattern - 0.5))
    for _ in range(int(rng.integers(3, 8))):
        # Background shapes with object-like colours keep "find the coloured blob" from
        # being a complete strategy.
        centre = (int(rng.uniform(0, w)), int(rng.uniform(0, h)))
        axes = (int(rng.uniform(0.03, 0.12) * scale) + 1, int(rng.uniform(0.03, 0.12) * scale) + 1)
        colour = hsv_colour(rng.random(), rng.uniform(0.2, 0.7), rng.uniform(0.3, 0.9))
        cv2.ellipse(canvas, centre, axes, float(rng.uniform(0, 180)), 0, 360,
                    [float(c) for c in colour], -1, cv2.LINE_AA)
    for hue in lookalike_hues:
        # Same hue family as an object, other pattern and shape: colour alone cannot tell
        # the object from it, its motion and shape can.
        half = int(rng.uniform(0.05, 0.1) * scale) + 1
        side = 2 * half + 1
        skin = object_texture(rng, side, hue)
        alpha = np.zeros((side, side), dtype=np.float32)
        cv2.ellipse(alpha, (half, half), (half, int(half * rng.uniform(0.4, 1.0))),
                    float(rng.uniform(0, 180)), 0, 360, 1.0, -1, cv2.LINE_AA)
        y, x = int(rng.integers(0, max(h - side, 1))), int(rng.integers(0, max(w - side, 1)))
        region = canvas[y:y + side, x:x + side]
        a = alpha[:region.shape[0], :region.shape[1], None]
        region[:] = region * (1 - a) + skin[:region.shape[0], :region.shape[1]] * a
    return np.clip(canvas, 0, 255).astype(np.float32)
