"""Apply one frame's whole geometry in a single cv2 warp (images bicubic, masks nearest).

`warp_frame` takes the FORWARD matrix source -> output (the product of the frame's affine,
resize and crop matrices) and an optional backward displacement field (the TPS warp, which
acts last, in output space). Without a field it is one cv2.warpAffine; with one, the affine
and the field are folded into a single remap map shared by the image and the mask.

Large downscales would alias with a point-sampling warp (PIL's resize, used by the
published loader, filters). When the warp shrinks the source by more than PREFILTER, the
region it reads is first reduced with INTER_AREA.
"""
from __future__ import annotations

import functools

import cv2
import numpy as np

#: Shrink factor above which the source region is area-averaged before the warp.
PREFILTER = 1.5


@functools.lru_cache(maxsize=4)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    return xs, ys


def _prefilter(image: np.ndarray, inverse: np.ndarray, size: int, margin: float
               ) -> tuple[np.ndarray, np.ndarray]:
    """Crop the source region the warp reads and area-reduce it if the warp shrinks it by
    more than PREFILTER; returns the new source and the adjusted inverse matrix."""
    fx = float(np.hypot(inverse[0, 0], inverse[0, 1]))  # source px per output px, along x
    fy = float(np.hypot(inverse[1, 0], inverse[1, 1]))
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


def warp_frame(image: np.ndarray, mask: np.ndarray, forward: np.ndarray, size: int,
               fill: tuple[int, int, int], displacement: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Warp an RGB image (H, W, 3) and its id mask (H, W) to size x size.

    Pixels from outside the source are `fill` in the image and 0 (background) in the mask.
    """
    inverse = np.linalg.inv(forward)
    margin = 0.0 if displacement is None else float(np.abs(displacement).max())
    src_image, image_inverse = _prefilter(image, inverse, size, margin)
    border = dict(borderMode=cv2.BORDER_CONSTANT)
    if displacement is None:
        flags = cv2.WARP_INVERSE_MAP
        out_image = cv2.warpAffine(src_image, image_inverse[:2], (size, size),
                                   flags=flags | cv2.INTER_CUBIC, borderValue=fill, **border)
        out_mask = cv2.warpAffine(mask, inverse[:2], (size, size),
                                  flags=flags | cv2.INTER_NEAREST, borderValue=0, **border)
        return out_image, out_mask
    xs, ys = _pixel_grid(size)
    qx, qy = xs + displacement[..., 0], ys + displacement[..., 1]

    def remap(src, inv, interpolation, value):
        a = inv.astype(np.float32)
        map_x = a[0, 0] * qx + a[0, 1] * qy + a[0, 2]
        map_y = a[1, 0] * qx + a[1, 1] * qy + a[1, 2]
        return cv2.remap(src, map_x, map_y, interpolation, borderValue=value, **border)

    out_image = remap(src_image, image_inverse, cv2.INTER_CUBIC, fill)
    out_mask = remap(mask, inverse, cv2.INTER_NEAREST, 0)
    return out_image, out_mask
