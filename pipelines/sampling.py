"""Which frames and which objects make a training clip (the published rules).

`TripletSampler` draws three frame indices by the published loader's rule (README, section
pipelines): gaps up to J + 1 where J = min(frames, max skip), end clamps that may
repeat a frame, reversed in time with probability 0.5. `eligible_objects` lists the objects a
clip may train on: those visible in its first frame, and for BL30K only those that pass the
object-size rule.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

#: BL30K object-size rule, in pixels of the 384x384 clip (published): an object counts if it
#: covers more than MIN_AREA in the first frame, and if it covers at most SMALL_AREA there,
#: only if it stays under STAY_SMALL_AREA in the other two frames (a small object that
#: is actually big elsewhere is a partial view, not a target).
MIN_AREA = 10 * 10
SMALL_AREA = 30 * 30
STAY_SMALL_AREA = 20 * 20


@dataclass(frozen=True)
class TripletSampler:
    """max_skip is in frame-list units: the curriculum skip for DAVIS and BL30K, the
    curriculum skip divided by 5 for YouTubeVOS (annotated every 5th frame)."""
    max_skip: int
    reverse_p: float = 0.5

    def __post_init__(self):
        if self.max_skip < 1:
            raise ValueError(f"max_skip must be >= 1 frame, got {self.max_skip}")

    def sample(self, num_frames: int, rng: np.random.Generator) -> list[int]:
        """Three frame indices of a video with `num_frames` (>= 3) listed frames, by the
        published rule: J = min(N, max_skip); i0 uniform in 0..N-J; each next index is the
        previous plus a gap uniform in 1..J+1, clamped to N-J (i1) or N-J//2 (i2) and to N-1.
        The clamps near the end repeat a frame (i1 == i0 or i2 == i1): kept, as published."""
        n = num_frames
        if n < 3:
            raise ValueError(f"a triplet needs a video of at least 3 frames, got {n}")
        jump = min(n, self.max_skip)
        i0 = int(rng.integers(n - jump + 1))
        i1 = min(i0 + int(rng.integers(jump + 1)) + 1, n - jump, n - 1)
        i2 = min(i1 + int(rng.integers(jump + 1)) + 1, n - jump // 2, n - 1)
        indices = [i0, i1, i2]
        if rng.random() < self.reverse_p:
            indices.reverse()
        return indices


#: Up to this largest id, a mask's areas are counted id by id, else in one histogram pass.
FEW_IDS = 16


def _areas(mask: np.ndarray) -> dict[int, int]:
    """Pixel count of each object id (nonzero) present in a uint8 mask. Clips hold a few
    objects: a compare and count per id costs ~12 us at 384x384, a histogram pass
    (cv2.calcHist; np.bincount is slower) ~0.3 ms, a few % of a clip (measured)."""
    mask = np.ascontiguousarray(mask)
    top = int(cv2.minMaxLoc(mask)[1])
    if top > FEW_IDS:
        hist = cv2.calcHist([mask], [0], None, [256], [0, 256]).reshape(-1)
        return {int(i): int(hist[i]) for i in np.flatnonzero(hist) if i}
    areas = {}
    for i in range(1, top + 1):
        count = cv2.countNonZero(cv2.compare(mask, i, cv2.CMP_EQ))
        if count:
            areas[i] = count
    return areas


def eligible_objects(masks: np.ndarray, size_rule: bool = False) -> list[int]:
    """Object ids of a clip's masks (3, H, W) that may be chosen as targets: present in the
    first frame and, with `size_rule` (BL30K), passing the object-size rule."""
    first = _areas(masks[0])
    ids = sorted(first)
    if not size_rule:
        return ids
    later = [_areas(m) for m in masks[1:]]
    keep = []
    for i in ids:
        if first[i] <= MIN_AREA:
            continue
        if first[i] > SMALL_AREA or max((a.get(i, 0) for a in later), default=0) < STAY_SMALL_AREA:
            keep.append(i)
    return keep
