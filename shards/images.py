"""Image conventions shared by the pipelines, the trainer and the evaluation (one home each):
the DAVIS palette, the colours of object overlays and the shorter-side resize rule.

DAVIS, YouTubeVOS and BL30K store label maps as indexed ("P" mode) PNGs whose palette is the
PASCAL VOC colour map: index 0 black, 1 dark red, 2 dark green, ... The pixel values are the
object ids; the palette only matters to people looking at the files (and to tools that copy
it into their outputs).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=1)
def davis_palette() -> bytes:
    """The 256-entry RGB palette (768 bytes) of DAVIS/YouTubeVOS annotation PNGs.

    Colour i spreads the bits of i over the three channels, most significant bit first:
    bit 3j of i goes to bit 7-j of red, bit 3j+1 to green, bit 3j+2 to blue.
    """
    ids = np.arange(256)
    rgb = np.zeros((256, 3), dtype=np.int64)
    for j in range(8):
        for channel in range(3):
            bit = (ids >> (3 * j + channel)) & 1
            rgb[:, channel] |= bit << (7 - j)
    return rgb.astype(np.uint8).tobytes()


# Vivid, mutually distinct colours (RGB) for drawing object ids 1, 2, ... over frames (contact
# sheets, TensorBoard images); id k takes entry (k - 1) mod len. The DAVIS palette's dark reds
# and greens vanish on video frames.
OBJECT_COLOURS = np.array([
    (255, 40, 40), (40, 220, 60), (40, 120, 255), (255, 220, 0), (255, 0, 220),
    (0, 230, 230), (255, 140, 0), (160, 80, 255), (150, 255, 120), (255, 150, 190),
    (0, 150, 130), (200, 160, 90)], np.uint8)


def object_colour(object_id: int) -> np.ndarray:
    """The overlay colour (RGB uint8) of object id `object_id` (1, 2, ...)."""
    return OBJECT_COLOURS[(int(object_id) - 1) % len(OBJECT_COLOURS)]


def shorter_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """Output (width, height) of resizing the shorter side to `size`, the longer side scaled
    and truncated (torchvision's Resize(int) rule)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


__all__ = ["davis_palette", "OBJECT_COLOURS", "object_colour", "shorter_side_size"]
