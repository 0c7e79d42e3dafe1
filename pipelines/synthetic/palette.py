"""The mask file formats of the official data sets.

DAVIS, YouTubeVOS and BL30K store label maps as indexed ("P" mode) PNGs with the DAVIS
palette (`shards.images.davis_palette`); DAVIS 2016 and the static saliency sets store
binary 0/255 masks.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from shards.images import davis_palette


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
