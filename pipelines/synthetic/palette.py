"""The DAVIS colour palette and the mask file formats of the official data sets.

DAVIS, YouTubeVOS and BL30K store label maps as indexed ("P" mode) PNGs whose palette is the
PASCAL VOC colour map: index 0 black, 1 dark red, 2 dark green, ... The pixel values are the
object ids; the palette only matters to people looking at the files (and to tools that copy
it into their outputs). DAVIS 2016 and the static saliency sets store binary 0/255 masks.
"""
from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image


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


def indexed_png(ids: np.ndarray) -> Image.Image:
    """An indexed PIL image of an object-id map (uint8, 0 = background) with the DAVIS palette."""
    if ids.dtype != np.uint8 or ids.ndim != 2:
        raise ValueError(f"expected a 2-D uint8 id map, got {ids.dtype} {ids.shape}")
    image = Image.fromarray(ids)  # mode "L"; putpalette turns it into "P" keeping the values
    image.putpalette(davis_palette())
    return image


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    # No timestamp chunks: same pixels, same bytes. Level 3 halves the encoding time of the
    # default (6) for masks about twice as large (a few KB at 480p).
    image.save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def indexed_png_bytes(ids: np.ndarray) -> bytes:
    """An id map encoded as an indexed PNG with the DAVIS palette."""
    return _png_bytes(indexed_png(ids))


def binary_png_bytes(foreground: np.ndarray) -> bytes:
    """A boolean mask encoded as an 8-bit grayscale PNG holding only 0 and 255."""
    return _png_bytes(Image.fromarray(np.where(foreground, 255, 0).astype(np.uint8)))
