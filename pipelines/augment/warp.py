"""Apply one frame's whole geometry in a single cv2 warp, with the published per-step fill.

The published loader runs its augmentation as a chain of steps, each on its own canvas: a
pixel that a step reads from outside ITS input canvas gets that step's fill (the image mean,
or black for the thin-plate-spline warp), whatever lies beyond that canvas in the source.
Here the chain is one warp (images bicubic, id masks nearest, soft masks bicubic) from the
source, and the fills are put back afterwards: for every output pixel the coordinates it
has in each step's input canvas are affine maps of the same grid, so the pixels that stay
inside a step's canvas form a convex polygon in output space, drawn at sub-pixel precision
(far cheaper than testing each pixel); a pixel that left any canvas takes the fill of the
step nearest the output that it left. Only pixels within the interpolation kernel of a
canvas edge differ from the step-by-step chain (the chain blends them with the fill; one
warp reads the real source there), besides the chain's repeated interpolation.

`FrameWarp` (and `warp_frame`, which applies one to an image and its masks) takes the steps
(`Step`: forward matrix input canvas -> output canvas, the input canvas size, its fill) and
an optional backward displacement field (the TPS warp, which acts last, in output space, on
a size x size canvas). Without a field each array is one cv2.warpAffine; with one, the
affine and the field are folded into a single remap map.

Large downscales would alias with a point-sampling warp (PIL's resize, used by the
published loader, filters). When the warp shrinks the source by more than PREFILTER, the
region it reads is first reduced with INTER_AREA (images only: masks are point-sampled, as
the published chain's nearest resize does).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import cv2
import numpy as np

#: Shrink factor above which the source region is area-averaged before the warp.
PREFILTER = 1.5
BLACK = (0, 0, 0)


@dataclass(frozen=True)
class Step:
    """One geometric step of the chain. `forward` maps its input canvas (pixel centres at
    integers, `canvas` = (width, height)) to its output canvas; what it reads from outside
    its input canvas is `fill` in the image and 0 in the masks. fill None: the step cannot
    read outside (a resize of the whole canvas), so it needs no check."""
    forward: np.ndarray
    canvas: tuple[int, int]
    fill: tuple[int, int, int] | None


class Warped(NamedTuple):
    image: np.ndarray             # (size, size, 3) uint8
    ids: np.ndarray | None        # (size, size) uint8 object ids, nearest
    soft: np.ndarray | None       # (size, size) uint8 0..255 soft mask, bicubic
    fill: np.ndarray              # (size, size) bool: the pixel is some step's fill
    fill_fraction: float          # its share of the frame


@functools.lru_cache(maxsize=8)
def _constant(size: int, value: tuple[int, int, int]) -> np.ndarray:
    return np.full((size, size, 3), value, np.uint8)


@functools.lru_cache(maxsize=4)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    return xs, ys


def _prefilter(image: np.ndarray, inverse: np.ndarray, size: int, margin: float
               ) -> tuple[np.ndarray, np.ndarray]:
    """Crop the source region the warp reads and area-reduce it if the warp shrinks it by
    more than PREFILTER; returns the new source and the adjusted inverse matrix."""
    (a, b), (c, d) = inverse[:2, :2].tolist()  # plain floats: numpy's scalars cost more
    fx, fy = math.hypot(a, b), math.hypot(c, d)  # source px per output px, along x and y
    if max(fx, fy) <= PREFILTER:
        return image, inverse
    h, w = image.shape[:2]
    corners = inverse @ np.array([[-margin, size + margin, -margin, size + margin],
                                  [-margin, -margin, size + margin, size + margin],
                                  [1.0, 1.0, 1.0, 1.0]])
    x0 = int(np.clip(np.floor(corners[0].min()) - 2, 0, w - 1))
    x1 = int(np.clip(np.ceil(corners[0].max()) + 3, x0 + 1, w))
    y0 = int(np.clip(np.floor(corners[1].min()) - 2, 0, h - 1))
    y1 = int(np.clip(np.ceil(corners[1].max()) + 3, y0 + 1, h))
    region = image[y0:y1, x0:x1]
    rw = max(1, int(round((x1 - x0) / max(fx, 1.0))))
    rh = max(1, int(round((y1 - y0) / max(fy, 1.0))))
    reduced = cv2.resize(region, (rw, rh), interpolation=cv2.INTER_AREA)
    # source px -> reduced px: shift to the region, then resize with pixel centres aligned
    sx, sy = rw / (x1 - x0), rh / (y1 - y0)
    to_reduced = np.array([[sx, 0.0, (0.5 - x0) * sx - 0.5],
                           [0.0, sy, (0.5 - y0) * sy - 0.5],
                           [0.0, 0.0, 1.0]])
    return reduced, to_reduced @ inverse


def _affine_inverse(m: np.ndarray) -> np.ndarray:
    """Inverse of an affine 3x3 matrix, in plain floats (np.linalg.inv costs ~10 us a call,
    several per frame)."""
    (a, b, c), (d, e, f) = m[:2].tolist()
    det = a * e - b * d
    return np.array([[e / det, -b / det, (b * f - c * e) / det],
                     [-d / det, a / det, (c * d - a * f) / det], [0.0, 0.0, 1.0]])


def _inset(xs: list[float], ys: list[float]) -> np.ndarray:
    """The parallelogram with corners (xs, ys) with each edge moved inwards by half a
    pixel times the larger component of its normal. cv2's polygon fill rounds each span to
    the nearest pixel, so it takes in pixels whose centres lie up to half a pixel outside;
    inset, it fills about the pixels whose centres are inside (measured: ~16 of 147456
    pixels differ per frame, against ~365 one-sided without the inset). Returns the corners
    as cv2 wants them with shift=8: int32 (4, 2) in 1/256 px."""
    cx, cy = sum(xs) / 4, sum(ys) / 4
    lines = []
    for k in range(4):
        ax, ay, bx, by = xs[k], ys[k], xs[(k + 1) % 4], ys[(k + 1) % 4]
        length = max(math.hypot(bx - ax, by - ay), 1e-12)
        nx, ny = (ay - by) / length, (bx - ax) / length
        if (cx - ax) * nx + (cy - ay) * ny < 0:
            nx, ny = -nx, -ny
        lines.append((nx, ny, ax * nx + ay * ny + 0.5 * max(abs(nx), abs(ny))))
    out = []
    for k in range(4):  # corner k: where the lines of edges k-1 and k meet
        (n1x, n1y, d1), (n2x, n2y, d2) = lines[k - 1], lines[k]
        det = n1x * n2y - n1y * n2x
        out.append((round((d1 * n2y - n1y * d2) / det * 256),
                    round((n1x * d2 - d1 * n2x) / det * 256)))
    return np.array(out, np.int32)


def _outside_plane(label: np.ndarray, after: np.ndarray, canvas: tuple[int, int],
                   code: int, blank: bool) -> bool:
    """Set `label` (uint8, the chain's output space) to `code` where a pixel maps, by the
    inverse of `after` (this step and all later ones), outside the step's input canvas;
    `blank`: label is all 0 so far. Returns whether any pixel can be outside.

    That region is the complement of the canvas rectangle's image, a convex polygon drawn
    with sub-pixel precision: far cheaper than testing every pixel's coordinates."""
    w, h = canvas
    m = label.shape[0] - 1
    (a, b, c), (d, e, f) = _affine_inverse(after)[:2].tolist()
    us = (c, a * m + c, b * m + c, (a + b) * m + c)  # the output corners, on the canvas
    vs = (f, d * m + f, e * m + f, (d + e) * m + f)
    if min(us) >= -0.5 and max(us) < w - 0.5 and min(vs) >= -0.5 and max(vs) < h - 0.5:
        return False  # the output square maps inside (an affine image of it: its corners do)
    (a, b, c), (d, e, f) = after[:2].tolist()
    rect = ((-0.5, -0.5), (w - 0.5, -0.5), (w - 0.5, h - 0.5), (-0.5, h - 0.5))
    polygon = _inset([a * x + b * y + c for x, y in rect], [d * x + e * y + f for x, y in rect])
    if blank:  # nothing to keep: draw in place
        label.fill(code)
        cv2.fillConvexPoly(label, polygon, 0, lineType=cv2.LINE_8, shift=8)
        return True
    outside = np.full_like(label, code)
    cv2.fillConvexPoly(outside, polygon, 0, lineType=cv2.LINE_8, shift=8)
    cv2.max(label, outside, dst=label)  # codes grow along the chain: the later step wins
    return True


def _warp_soft(soft: np.ndarray, inverse: np.ndarray, size: int, warp, qx, qy) -> np.ndarray:
    """The bicubic warp of an 8-bit soft mask, computed only near its edges.

    A soft mask is mostly flat: where the nearest warp is constant over the reach of the
    bicubic kernel (2 source px), the bicubic value is that constant. So: nearest warp,
    then bicubic only on the band of pixels that see a change (a few % of them; a full
    bicubic warp would cost about as much as the image's). Under a strong shrink a stroke
    thinner than the sampling step can fall between the nearest samples and stay 0; the
    published chain, which resizes the mask nearest, loses such strokes too."""
    near = warp(soft, inverse, cv2.INTER_NEAREST, 0)
    (a, b), (c, d) = inverse[:2, :2].tolist()
    total = a * a + b * b + c * c + d * d  # smallest singular value: src px per out px
    shrink = math.sqrt(max(total - math.sqrt(max(total ** 2 - 4 * (a * d - b * c) ** 2, 0.0)),
                           1e-12) / 2)
    reach = int(np.ceil(2.0 / shrink)) + 1 + (qx is not None)  # +1: the field's stretch
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * reach + 1, 2 * reach + 1))
    band = cv2.compare(cv2.dilate(near, kernel), cv2.erode(near, kernel), cv2.CMP_NE)
    points = cv2.findNonZero(band)  # x, y per row (shape (n, 1, 2) or (n, 2))
    if points is not None:
        xs, ys = points.reshape(-1, 2).T
        if qx is None:
            px, py = xs.astype(np.float32), ys.astype(np.float32)
        else:
            px, py = qx[ys, xs], qy[ys, xs]
        n = len(xs)
        a = inverse.astype(np.float32)
        # remap wants maps under 32767 rows: lay the band out as rows of `size`
        rows = -(-n // size)
        map_x = np.full(rows * size, -1e4, np.float32)
        map_y = np.full(rows * size, -1e4, np.float32)
        map_x[:n] = a[0, 0] * px + a[0, 1] * py + a[0, 2]
        map_y[:n] = a[1, 0] * px + a[1, 1] * py + a[1, 2]
        values = cv2.remap(soft, map_x.reshape(rows, size), map_y.reshape(rows, size),
                           cv2.INTER_CUBIC, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        near[ys, xs] = values.ravel()[:n]
    return near


class FrameWarp:
    """One frame's geometry: `steps` (applied first to last), then the backward displacement
    field (size, size, 2) if given, to size x size. Built once (where each output pixel
    reads, and which fill it takes), then applied to the frame's image and masks, each in
    one interpolation; so a clip can warp its masks, check them, and warp its images (the
    costly part) only if they pass.

    Every output pixel that some step reads from outside its input canvas is that step's
    fill (the last such step along the chain wins, as in the step-by-step chain); masks are
    0 there. The displacement field's canvas is the size x size output of the last step and
    its fill is `displacement_fill`."""

    def __init__(self, steps: Sequence[Step], size: int,
                 displacement: np.ndarray | None = None, displacement_fill=BLACK):
        afters = [np.eye(3)]  # afters[k]: step k's input canvas -> output (steps k, k+1, ...)
        for step in reversed(steps):
            afters.insert(0, afters[0] @ step.forward)
        self.size = size
        self.inverse = _affine_inverse(afters[0])
        self.margin = 0.0 if displacement is None else float(np.abs(displacement).max())
        self.first_fill = steps[0].fill if steps and steps[0].fill is not None else BLACK
        self.qx = self.qy = None
        self._maps: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}  # masks share one map
        if displacement is not None:
            xs, ys = _pixel_grid(size)
            self.qx, self.qy = xs + displacement[..., 0], ys + displacement[..., 1]

        # Which fill each pixel gets, as a label plane: 0 image, k the k-th fill along the
        # chain; a later step's fill overwrites an earlier one's (the chain's output shows it).
        label = np.zeros((size, size), np.uint8)
        self.fills: list[tuple[int, int, int]] = []
        drawn = False
        for step, after in zip(steps, afters):
            if step.fill is not None:
                if not self.fills or self.fills[-1] != tuple(step.fill):  # a run of equal
                    self.fills.append(tuple(step.fill))                   # fills: one code
                drawn |= _outside_plane(label, after, step.canvas, len(self.fills), not drawn)
        if displacement is not None:
            # the field reads the affine chain's output canvas: beyond it, its own fill
            self.fills.append(tuple(displacement_fill))
            label = cv2.remap(label, self.qx, self.qy, cv2.INTER_NEAREST,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=len(self.fills))
        self.label = label
        self.valid = cv2.compare(label, 0, cv2.CMP_EQ)  # 255 where the pixel is image
        self.fill_fraction = 1.0 - cv2.countNonZero(self.valid) / (size * size)

    @property
    def fill(self) -> np.ndarray:
        """(size, size) bool: the pixel is some step's fill."""
        return self.valid == 0

    def _warp(self, src, inv, interpolation, value, dst=None):
        if self.qx is None:
            return cv2.warpAffine(src, inv[:2], (self.size, self.size), dst=dst,
                                  flags=cv2.WARP_INVERSE_MAP | interpolation,
                                  borderMode=cv2.BORDER_CONSTANT, borderValue=value)
        key = inv.tobytes()
        if key not in self._maps:
            a = inv.astype(np.float32)
            self._maps[key] = (a[0, 0] * self.qx + a[0, 1] * self.qy + a[0, 2],
                               a[1, 0] * self.qx + a[1, 1] * self.qy + a[1, 2])
        return cv2.remap(src, *self._maps[key], interpolation, dst=dst,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=value)

    def image(self, image: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The warped RGB image (H, W, 3) -> (size, size, 3) uint8, bicubic, with the fills;
        into `out` if given (a C-contiguous array of that shape)."""
        src, inverse = _prefilter(image, self.inverse, self.size, self.margin)
        out = self._warp(src, inverse, cv2.INTER_CUBIC, self.first_fill, out)
        if len(self.fills) == 1:  # one fill (video): the label plane (0 or 1) is its mask
            if self.fill_fraction:
                cv2.copyTo(_constant(self.size, self.fills[0]), self.label, out)
            return out
        for code, value in enumerate(self.fills, start=1):
            where = cv2.compare(self.label, code, cv2.CMP_EQ)
            if cv2.countNonZero(where):
                cv2.copyTo(_constant(self.size, value), where, out)
        return out

    def ids(self, ids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The warped id mask (H, W) -> (size, size) uint8, nearest, 0 on the fills."""
        out = self._warp(ids, self.inverse, cv2.INTER_NEAREST, 0, out)
        return cv2.bitwise_and(out, self.valid, dst=out)

    def soft(self, soft: np.ndarray) -> np.ndarray:
        """The warped 8-bit soft mask (H, W) -> (size, size) uint8, bicubic, 0 on the fills."""
        out = _warp_soft(soft, self.inverse, self.size, self._warp, self.qx, self.qy)
        return cv2.bitwise_and(out, self.valid, dst=out)


def warp_frame(image: np.ndarray, steps: Sequence[Step], size: int, *,
               ids: np.ndarray | None = None, soft: np.ndarray | None = None,
               displacement: np.ndarray | None = None, displacement_fill=BLACK) -> Warped:
    """Warp an RGB image (H, W, 3), and optionally its id mask (H, W, nearest) and 8-bit soft
    mask (H, W, bicubic), through `steps` and then the displacement field if given (see
    FrameWarp), to size x size, in one interpolation each."""
    warp = FrameWarp(steps, size, displacement, displacement_fill)
    return Warped(warp.image(image), None if ids is None else warp.ids(ids),
                  None if soft is None else warp.soft(soft), warp.fill, warp.fill_fraction)
