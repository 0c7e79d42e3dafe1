"""Random affine and crop geometry as 3x3 matrices in pixel-centre coordinates.

Every function returns a FORWARD matrix (source pixel -> output pixel); the chain of one frame
is multiplied together and inverted once, so all geometry of a frame costs one warp.
Parameters are drawn from an explicit `np.random.Generator` and returned with the matrix, so
the clip's metadata can record them.
"""
from __future__ import annotations

import math

import numpy as np


def translation(tx: float, ty: float) -> np.ndarray:
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


def scaling(sx: float, sy: float) -> np.ndarray:
    return np.array([[sx, 0.0, 0.0], [0.0, sy, 0.0], [0.0, 0.0, 1.0]])


def resize_matrix(src_wh: tuple[float, float], dst_wh: tuple[float, float]) -> np.ndarray:
    """Resizing an image of size src_wh to dst_wh, with pixel centres at integers."""
    sx, sy = dst_wh[0] / src_wh[0], dst_wh[1] / src_wh[1]
    return translation(-0.5, -0.5) @ scaling(sx, sy) @ translation(0.5, 0.5)


def centred_affine(width: float, height: float, angle: float = 0.0, scale: float = 1.0,
                   shear: float = 0.0) -> np.ndarray:
    """Rotation (degrees), isotropic scale and x shear (degrees) about the image centre, the
    output keeping the input size (as torchvision's RandomAffine does)."""
    a, s = math.radians(angle), math.radians(shear)
    rotate = np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0],
                       [0.0, 0.0, 1.0]])
    shear_x = np.array([[1.0, math.tan(s), 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    cx, cy = (width - 1) / 2, (height - 1) / 2
    return translation(cx, cy) @ rotate @ shear_x @ scaling(scale, scale) @ translation(-cx, -cy)


def random_affine(rng: np.random.Generator, width: float, height: float, *, degrees: float = 0.0,
                  scale: tuple[float, float] = (1.0, 1.0), shear: float = 0.0
                  ) -> tuple[np.ndarray, dict]:
    """A centred affine with angle in [-degrees, degrees], scale in `scale`, x shear in
    [-shear, shear]; returns (matrix, parameters)."""
    params = {"angle": float(rng.uniform(-degrees, degrees)),
              "scale": float(rng.uniform(*scale)),
              "shear": float(rng.uniform(-shear, shear))}
    return centred_affine(width, height, **params), params


def random_resized_crop(rng: np.random.Generator, width: int, height: int, size: int,
                        scale: tuple[float, float], ratio: tuple[float, float]
                        ) -> tuple[np.ndarray, dict]:
    """A crop of random area fraction in `scale` and aspect ratio in `ratio` (log-uniform),
    resized to size x size; centre crop of the clamped ratio after ten misses (the
    torchvision RandomResizedCrop rule). Returns (matrix, parameters)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            x = int(rng.integers(0, width - w + 1))
            y = int(rng.integers(0, height - h + 1))
            break
    else:
        in_ratio = width / height
        if in_ratio < ratio[0]:
            w, h = width, int(round(width / ratio[0]))
        elif in_ratio > ratio[1]:
            w, h = int(round(height * ratio[1])), height
        else:
            w, h = width, height
        x, y = (width - w) // 2, (height - h) // 2
    matrix = resize_matrix((w, h), (size, size)) @ translation(-x, -y)
    return matrix, {"crop": [x, y, w, h], "area": w * h / area, "ratio": w / h}


def random_crop(rng: np.random.Generator, width: int, height: int, size: int
                ) -> tuple[np.ndarray, dict]:
    """A size x size crop at a random offset; an image smaller than `size` along an axis is
    centred (the rest is padding). Returns (matrix, parameters)."""
    x = int(rng.integers(0, width - size + 1)) if width >= size else -((size - width) // 2)
    y = int(rng.integers(0, height - size + 1)) if height >= size else -((size - height) // 2)
    return translation(-x, -y), {"offset": [x, y]}


