"""Moving-object scenes: textured sprites with shaped alpha over a panning textured background.

A `Scene` is plain data (sprites, motion parameters, depth order) drawn once from a
`np.random.Generator` by `make_scene`; `render` is then a pure function of (scene, frame
index). Objects move, spin, breathe in scale, occlude each other in depth order, and one of
them (the "wanderer") leaves the frame and comes back. The id map of a frame holds, per
pixel, the id of the front-most object covering it (alpha >= 0.5): the visible, un-occluded
object pixels, which is what the real annotations mark.

Only the bounding box of each object is warped, so a 480p frame costs a few milliseconds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import cv2
import numpy as np

from pipelines.synthetic.textures import background_texture, object_texture

SHAPES = ("ellipse", "polygon", "star", "blob")
SIZED_SHAPE = "disc"  # objects of a given area (BL30K's small ones): a disc of exactly that area

# How much of its own (un-occluded, in-frame) area an object must show in the first frame it
# is annotated in, so a first-frame mask is something a tracker can start from.
MIN_VISIBLE_FRACTION = 0.4
# Tries at drawing positions before settling for the best one seen.
PLACEMENT_TRIES = 40


@dataclass(frozen=True)
class ObjectSpec:
    """What a layout asks of one object. `area` (pixels) makes a small object of about that
    size, drawn in front of the others (BL30K's tiny objects); `growth` is the relative
    growth in scale over the whole video."""
    object_id: int
    start: int = 0
    area: float | None = None
    growth: float = 0.0


@dataclass(frozen=True)
class Sprite:
    """An object's appearance: colour premultiplied by alpha, and alpha, on a square canvas
    whose centre is the object's centre."""
    premultiplied: np.ndarray  # (S, S, 4) float32: RGB * alpha, alpha
    alpha: np.ndarray          # (S, S) float32, contiguous: warped alone for id maps
    shape: str                 # one of SHAPES: doubles as the object's category name

    @property
    def side(self) -> int:
        return self.premultiplied.shape[0]


@dataclass(frozen=True)
class Motion:
    """Smooth trajectory of an object: drift + wobble, folded back into the frame so the
    object bounces off its edges; or, for the wanderer, a half sine along one axis that
    carries it fully out of the frame and back."""
    centre: tuple[float, float]
    velocity: tuple[float, float]
    wobble: tuple[float, float]
    wobble_freq: float
    wobble_phase: tuple[float, float]
    angle: float        # degrees at frame 0
    spin: float         # degrees per frame
    scale: float
    scale_amp: float
    scale_freq: float
    scale_phase: float
    growth: float
    bounds: tuple[tuple[float, float], tuple[float, float]]  # (x lo, x hi), (y lo, y hi)
    exit_axis: int = -1          # 0 = x, 1 = y, -1 = stays in the frame
    exit_amplitude: float = 0.0  # signed, pixels
    frames: int = 1

    def pose(self, t: int) -> tuple[float, float, float, float]:
        """(centre x, centre y, angle in degrees, scale) at frame t."""
        progress = t / max(self.frames - 1, 1)
        centre = []
        for axis in range(2):
            if axis == self.exit_axis:
                centre.append(self.centre[axis] + self.exit_amplitude * np.sin(np.pi * progress))
                continue
            drift = (self.centre[axis] + self.velocity[axis] * t
                     + self.wobble[axis] * np.sin(self.wobble_freq * t + self.wobble_phase[axis]))
            centre.append(_fold(drift, *self.bounds[axis]))
        scale = (self.scale * (1 + self.scale_amp * np.sin(self.scale_freq * t + self.scale_phase))
                 * (1 + self.growth * progress))
        return centre[0], centre[1], self.angle + self.spin * t, scale


@dataclass(frozen=True)
class SceneObject:
    object_id: int
    sprite: Sprite
    motion: Motion
    start: int  # first frame the object is drawn in


@dataclass(frozen=True)
class Scene:
    size: tuple[int, int]   # (H, W)
    frames: int
    background: np.ndarray  # (H + 2 * margin_y, W + 2 * margin_x, 3) uint8 canvas
    pan: tuple[float, float, float, float]  # offset x, y at frame 0; velocity x, y (pixels)
    objects: tuple[SceneObject, ...]  # back to front
    wanderer: int | None = None       # id of the object that leaves and re-enters

    def pan_offset(self, t: int) -> tuple[int, int]:
        h, w = self.size
        span_y = self.background.shape[0] - h
        span_x = self.background.shape[1] - w
        x = _fold(self.pan[0] + self.pan[2] * t, 0, span_x)
        y = _fold(self.pan[1] + self.pan[3] * t, 0, span_y)
        return int(round(x)), int(round(y))


def _fold(value: float, lo: float, hi: float) -> float:
    """Reflect `value` into [lo, hi] (a triangle wave): motion that bounces off the bounds."""
    span = hi - lo
    if span <= 0:
        return (lo + hi) / 2
    u = (value - lo) % (2 * span)
    return lo + (u if u <= span else 2 * span - u)


def make_sprite(rng: np.random.Generator, radius: float, hue: float,
                shape: str | None = None) -> Sprite:
    """A textured sprite of about `radius` pixels: a random ellipse, polygon, star or blob."""
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    side = 2 * int(np.ceil(radius)) + 3
    half = side / 2
    n = 96
    theta = np.linspace(0, 2 * np.pi, n, endpoint=False)
    if shape == SIZED_SHAPE:
        r = np.ones(n)
    elif shape == "ellipse":
        minor = rng.uniform(0.45, 1.0)
        r = 1 / np.sqrt(np.cos(theta) ** 2 + (np.sin(theta) / minor) ** 2)
    elif shape == "polygon":
        corners = int(rng.integers(3, 8))
        theta = np.sort(rng.uniform(0, 2 * np.pi, corners))
        r = rng.uniform(0.7, 1.0, corners)
    elif shape == "star":
        points = int(rng.integers(5, 9))
        theta = np.linspace(0, 2 * np.pi, 2 * points, endpoint=False)
        r = np.where(np.arange(2 * points) % 2 == 0, 1.0, rng.uniform(0.4, 0.65))
    elif shape == "blob":
        r = np.ones(n)
        for k in range(2, 6):
            r = r + rng.uniform(0, 0.14) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
        r = r / r.max()
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES + (SIZED_SHAPE,)}")
    shift = 4  # sub-pixel vertex precision for anti-aliased edges
    points = np.stack([half + radius * r * np.cos(theta), half + radius * r * np.sin(theta)], -1)
    alpha = np.zeros((side, side), dtype=np.uint8)
    cv2.fillPoly(alpha, [np.round(points * (1 << shift)).astype(np.int32)], 255,
                 cv2.LINE_AA, shift)
    alpha_f = alpha.astype(np.float32) / 255.0
    skin = object_texture(rng, side, hue)
    return Sprite(np.concatenate([skin * alpha_f[..., None], alpha_f[..., None]], axis=-1),
                  alpha_f, shape)


def _draw_motion(rng: np.random.Generator, size: tuple[int, int], frames: int, radius: float,
                 growth: float, speed: float, exit_axis: int) -> Motion:
    h, w = size
    unit = min(h, w)
    margin = 0.25 * radius
    bounds = ((margin, w - margin), (margin, h - margin))
    direction = rng.uniform(0, 2 * np.pi)
    magnitude = rng.uniform(0.015, 0.045) * unit * speed
    centre = (rng.uniform(radius, max(radius, w - radius)), rng.uniform(radius, max(radius, h - radius)))
    exit_amplitude = 0.0
    if exit_axis >= 0:
        # Start near the middle of the exit axis and swing out past the far edge (fully
        # outside, with the sprite's diagonal and its scale swing to spare) and back.
        extent = (w, h)[exit_axis]
        start = extent / 2 + rng.uniform(-0.1, 0.1) * extent
        centre = (start, centre[1]) if exit_axis == 0 else (centre[0], start)
        sign = 1.0 if rng.random() < 0.5 else -1.0
        to_edge = extent - start if sign > 0 else start
        exit_amplitude = sign * 1.3 * (to_edge + 1.6 * radius * (1 + growth))
    return Motion(
        centre=centre,
        velocity=(magnitude * np.cos(direction), magnitude * np.sin(direction)),
        wobble=tuple(rng.uniform(0.02, 0.07, 2) * unit * speed),
        wobble_freq=rng.uniform(0.1, 0.4),
        wobble_phase=tuple(rng.uniform(0, 2 * np.pi, 2)),
        angle=rng.uniform(0, 360),
        spin=rng.choice([-1.0, 1.0]) * rng.uniform(1.0, 5.0) * speed,
        scale=1.0,
        scale_amp=rng.uniform(0.1, 0.25) if growth == 0 else 0.03,
        scale_freq=rng.uniform(0.05, 0.2),
        scale_phase=rng.uniform(0, 2 * np.pi),
        growth=growth,
        bounds=bounds,
        exit_axis=exit_axis,
        exit_amplitude=exit_amplitude,
        frames=frames,
    )


def make_scene(rng: np.random.Generator, size: tuple[int, int], frames: int,
               objects: Sequence[ObjectSpec], *, wanderer: bool = True, speed: float = 1.0,
               sprites: dict[int, Sprite] | None = None, object_scale: float = 1.0) -> Scene:
    """Draw a scene: sprites, depth order, trajectories and camera pan.

    `wanderer` makes one object that starts in frame 0 leave the frame and come back (needs
    at least 6 frames). `speed` scales all motion (YouTubeVOS is annotated every 5th frame, so
    its layout asks for slower objects). `object_scale` scales the size of the regular objects
    (not the ones of a given `area`). `sprites` overrides the appearance of given ids (the
    few-shot classes of FSS-1000 share one look). Positions are redrawn until every object
    shows at least MIN_VISIBLE_FRACTION of itself in its first frame.
    """
    h, w = size
    unit = min(h, w)
    ids = [spec.object_id for spec in objects]
    if len(set(ids)) != len(ids) or not all(0 < i < 256 for i in ids):
        raise ValueError(f"object ids must be distinct and in 1..255, got {ids}")
    hue0 = rng.random()
    regular = [s for s in objects if s.area is None]
    radii, made, hues = {}, {}, []
    for k, spec in enumerate(objects):
        given = (sprites or {}).get(spec.object_id)
        if given is not None:
            radii[spec.object_id] = (given.side - 3) / 2
            made[spec.object_id] = given
            continue
        if spec.area is None:
            radius = rng.uniform(0.1, 0.2) * unit * object_scale
            hue = (hue0 + k / max(len(regular), 1) + rng.uniform(-0.04, 0.04)) % 1.0
            shape = None
            hues.append(hue)
        else:
            radius = float(np.sqrt(spec.area / np.pi))
            hue, shape = rng.random(), SIZED_SHAPE
        radii[spec.object_id] = radius
        made[spec.object_id] = make_sprite(rng, radius, hue, shape)
    # Depth: regular objects in random order, small ones in front so their size is their size.
    order = [regular[i] for i in rng.permutation(len(regular))] + [s for s in objects if s.area is not None]
    candidates = [s.object_id for s in regular if s.start == 0]
    wanderer_id = int(rng.choice(candidates)) if wanderer and frames >= 6 and candidates else None
    exit_axis = int(rng.integers(2))

    margin = (int(0.12 * h) + 1, int(0.12 * w) + 1)
    lookalikes = tuple(rng.permutation(hues)[:(len(hues) + 1) // 2].tolist())
    background = np.round(background_texture(rng, (h + 2 * margin[0], w + 2 * margin[1]),
                                              lookalikes)).astype(np.uint8)
    pan_direction = rng.uniform(0, 2 * np.pi)
    pan_speed = rng.uniform(0.003, 0.012) * unit * speed
    pan = (rng.uniform(0, 2 * margin[1]), rng.uniform(0, 2 * margin[0]),
           pan_speed * np.cos(pan_direction), pan_speed * np.sin(pan_direction))

    best, best_score = None, -1.0
    for _ in range(PLACEMENT_TRIES):
        scene = Scene(size=size, frames=frames, background=background, pan=pan, wanderer=wanderer_id,
                      objects=tuple(
                          SceneObject(s.object_id, made[s.object_id],
                                      _draw_motion(rng, size, frames, radii[s.object_id], s.growth, speed,
                                                   exit_axis if s.object_id == wanderer_id else -1),
                                      s.start)
                          for s in order))
        score = _worst_first_visibility(scene)
        if score > best_score:
            best, best_score = scene, score
        if score >= MIN_VISIBLE_FRACTION:
            break
    if best_score <= 0:
        raise ValueError(f"could not place {len(objects)} objects in a {h}x{w} frame so that each "
                         f"is visible in its first frame; use fewer objects or a larger size")
    return best


def _placed(obj: SceneObject, t: int, size: tuple[int, int]):
    """Warp geometry of an object at frame t: (x0, y0, x1, y1, matrix) of its clipped
    bounding box, or None when it is outside the frame."""
    h, w = size
    cx, cy, angle, scale = obj.motion.pose(t)
    half = obj.sprite.side / 2
    matrix = cv2.getRotationMatrix2D((half, half), angle, scale)
    matrix[:, 2] += (cx - half, cy - half)
    corners = np.array([[0, 0, 1], [obj.sprite.side, 0, 1], [0, obj.sprite.side, 1],
                        [obj.sprite.side, obj.sprite.side, 1]], dtype=np.float64) @ matrix.T
    x0, y0 = np.floor(corners.min(0)).astype(int)
    x1, y1 = np.ceil(corners.max(0)).astype(int)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if x1 <= x0 or y1 <= y0:
        return None
    matrix[:, 2] -= (x0, y0)
    return x0, y0, x1, y1, matrix


def _warp(source: np.ndarray, placed) -> np.ndarray:
    """`source` (a sprite's premultiplied RGBA or its alpha) warped into the object's box."""
    x0, y0, x1, y1, matrix = placed
    return cv2.warpAffine(source, matrix, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def render(scene: Scene, t: int) -> tuple[np.ndarray, np.ndarray]:
    """Frame t of the scene: (RGB uint8 (H, W, 3), object ids uint8 (H, W))."""
    h, w = scene.size
    ox, oy = scene.pan_offset(t)
    image = scene.background[oy:oy + h, ox:ox + w].copy()
    ids = np.zeros((h, w), dtype=np.uint8)
    for obj in scene.objects:
        if t < obj.start:
            continue
        placed = _placed(obj, t, scene.size)
        if placed is None:
            continue
        x0, y0, x1, y1, _ = placed
        layer = _warp(obj.sprite.premultiplied, placed)
        alpha = layer[..., 3:4]
        # Blend in float inside the object's box only; the frame itself stays uint8.
        blended = image[y0:y1, x0:x1] * (1 - alpha) + layer[..., :3]
        image[y0:y1, x0:x1] = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
        ids[y0:y1, x0:x1][alpha[..., 0] >= 0.5] = obj.object_id
    return image, ids


def render_ids(scene: Scene, t: int) -> np.ndarray:
    """Only the id map of frame t (skips the colour work)."""
    ids = np.zeros(scene.size, dtype=np.uint8)
    for obj in scene.objects:
        if t < obj.start:
            continue
        placed = _placed(obj, t, scene.size)
        if placed is not None:
            x0, y0, x1, y1, _ = placed
            ids[y0:y1, x0:x1][_warp(obj.sprite.alpha, placed) >= 0.5] = obj.object_id
    return ids


def own_area(scene: Scene, obj: SceneObject, t: int) -> int:
    """Pixels of `obj` inside the frame at t, ignoring occlusion."""
    placed = _placed(obj, t, scene.size)
    if placed is None:
        return 0
    return int((_warp(obj.sprite.alpha, placed) >= 0.5).sum())


def _worst_first_visibility(scene: Scene) -> float:
    """The smallest visible fraction of any object in the frame it starts in."""
    worst = 1.0
    for start in sorted({obj.start for obj in scene.objects}):
        ids = render_ids(scene, start)
        for obj in scene.objects:
            if obj.start == start:
                total = own_area(scene, obj, start)
                worst = min(worst, float((ids == obj.object_id).sum()) / total if total else 0.0)
    return worst


def render_video(scene: Scene) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(t, RGB, ids) for every frame of the scene."""
    for t in range(scene.frames):
        image, ids = render(scene, t)
        yield t, image, ids
