"""Sample codec: one clip sample <-> the byte members of one tar entry group.

A clip sample (the project's data contract):
    {"__key__": str, "frames": uint8 (T, H, W, 3) RGB, "masks": uint8 (T, H, W) object ids,
     "meta": JSON-serialisable dict}
is stored as three members:
    frames.jpg     the T frames stacked vertically into ONE (T*H, W, 3) baseline JPEG
                   (quality 90, 4:4:4: chosen on tools/bench_codec, see docs/FIDELITY.md).
                   One decoder call per clip is faster than T calls
                   and the strip stays viewable with any image tool.
    masks.u8.zlib  the (T, H, W) uint8 label maps: a 6-byte header (T, H, W as
                   little-endian uint16) then the raw bytes as a zlib stream (any zlib
                   reads it): written by ISA-L's level 1 when isal is installed, else by
                   zlib's level 1 (same arrays; ISA-L: 0.06 against 0.7-0.85 ms per 384x384
                   clip, ~40% fewer bytes, measured; zlib's fast level crawls over the
                   long runs of 0 a label map is mostly made of).
                   Every object id is kept. It decodes several times faster than PNG
                   (measured, see docs/DESIGN.md) for a few KB per clip next to ~100 KB of JPEG.
    soft.u8.zlib   optional (static clips): (T, H, W) uint8 soft masks, 0..255 for 0..1,
                   in the label maps' format. The published static loader keeps the
                   warped mask soft: frame 0's soft mask is the value encoder's input and
                   the target is mask > 0.5 (the label maps hold that target).
    meta.json      the metadata dict, UTF-8 JSON with sorted keys.
A sample may also carry "soft" (uint8 (T, H, W), or None); decoding gives "soft" (the array,
or None when the sample has none).

Decoding uses simplejpeg (libjpeg-turbo, decodes straight into a caller's buffer, strict
about corrupt data) when installed, otherwise OpenCV. Any decode problem raises
`SampleDecodeError`.
"""
from __future__ import annotations

import json
import struct
import zlib
from typing import Any

import cv2
import numpy as np

try:  # the faster decoder; OpenCV is the always-available fallback
    import simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
    simplejpeg = None
try:  # zlib's format and interface, several times faster both ways (ISA-L): shards' label
    from isal import isal_zlib as DEFLATE  # maps, annotation PNGs; zlib is the fallback
except ImportError:  # pragma: no cover - depends on the environment
    DEFLATE = zlib

FRAMES = "frames.jpg"
MASKS = "masks.u8.zlib"
META = "meta.json"
SOFT = "soft.u8.zlib"
MEMBERS = (FRAMES, MASKS, META)        # every sample has these
OPTIONAL_MEMBERS = (SOFT,)
#: Tar order: the optional members before meta.json, so a sample cut short by a truncated
#: tar never looks complete without them.
WRITE_ORDER = (FRAMES, MASKS, SOFT, META)
DEFAULT_JPEG_QUALITY = 90
#: chroma subsampling of the frames: 4:4:4 keeps colour edges on the mask edges (4:2:0 costs
#: 3.4 dB of PSNR for 21% fewer bytes; measured by tools/bench_codec, see docs/FIDELITY.md)
JPEG_SAMPLING = {"420": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420,
                 "422": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422,
                 "444": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444}
DEFAULT_JPEG_SAMPLING = "444"
_MASK_HEADER = struct.Struct("<3H")
JPEG_DECODER = "simplejpeg" if simplejpeg is not None else "opencv"


class SampleDecodeError(ValueError):
    """A sample's bytes could not be turned back into arrays (corrupt or missing member)."""


def _json_default(value: Any):
    # numpy scalars and arrays show up in augmentation parameters; store them as plain JSON.
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"meta value {value!r} of type {type(value).__name__} is not JSON-serialisable")


def check_key(key: Any) -> str:
    if not isinstance(key, str) or not key or "." in key or key != key.strip():
        raise ValueError(
            f"sample __key__ {key!r} must be a non-empty string without dots or surrounding "
            "spaces (the dot separates the key from the member name in the tar)")
    return key


def encode_sample(sample: dict, jpeg_quality: int = DEFAULT_JPEG_QUALITY,
                  jpeg_sampling: str = DEFAULT_JPEG_SAMPLING) -> dict[str, bytes]:
    """Encode a clip sample into {"__key__": key, member name: bytes}; `jpeg_sampling` is
    a key of JPEG_SAMPLING (chroma subsampling)."""
    key = check_key(sample.get("__key__"))
    frames, masks = sample.get("frames"), sample.get("masks")
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 \
            or frames.shape[-1] != 3:
        raise ValueError(f"sample {key}: frames must be a uint8 array (T, H, W, 3), got "
                         f"{getattr(frames, 'dtype', type(frames))} {getattr(frames, 'shape', '')}")
    if not isinstance(masks, np.ndarray) or masks.dtype != np.uint8 \
            or masks.shape != frames.shape[:3]:
        raise ValueError(f"sample {key}: masks must be a uint8 array {frames.shape[:3]} (T, H, W) "
                         f"matching the frames, got {getattr(masks, 'dtype', type(masks))} "
                         f"{getattr(masks, 'shape', '')}")
    soft = sample.get("soft")
    if soft is not None and (not isinstance(soft, np.ndarray) or soft.dtype != np.uint8
                             or soft.shape != masks.shape):
        raise ValueError(f"sample {key}: soft masks must be a uint8 array {masks.shape} "
                         f"(T, H, W) like the masks, got {getattr(soft, 'dtype', type(soft))} "
                         f"{getattr(soft, 'shape', '')}")
    t, h, w, _ = frames.shape
    strip = np.ascontiguousarray(frames).reshape(t * h, w, 3)
    ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(strip, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality),
                            cv2.IMWRITE_JPEG_SAMPLING_FACTOR, JPEG_SAMPLING[jpeg_sampling]])
    if not ok:
        raise ValueError(f"sample {key}: JPEG encoding failed for frames {frames.shape}")
    meta = sample.get("meta", {})
    try:
        meta_bytes = json.dumps(meta, sort_keys=True, default=_json_default).encode("utf-8")
    except (TypeError, ValueError) as err:
        raise ValueError(f"sample {key}: meta is not JSON-serialisable: {err}") from None
    members = {"__key__": key, FRAMES: jpg.tobytes(), MASKS: encode_masks(masks),
               META: meta_bytes}
    if soft is not None:
        members[SOFT] = encode_masks(soft)
    return members


def encode_masks(masks: np.ndarray) -> bytes:
    return _MASK_HEADER.pack(*masks.shape) + DEFLATE.compress(np.ascontiguousarray(masks).data, 1)


def decode_masks(data: bytes) -> np.ndarray:
    shape = _MASK_HEADER.unpack_from(data)
    raw = zlib.decompress(memoryview(data)[_MASK_HEADER.size:])
    if len(raw) != shape[0] * shape[1] * shape[2]:
        raise ValueError(f"label maps hold {len(raw)} bytes, the header says {shape}")
    return np.frombuffer(raw, np.uint8).reshape(shape)


def decode_jpeg(data: bytes, out: np.ndarray | None = None) -> np.ndarray:
    """RGB uint8 (H, W, 3) from JPEG bytes, written into `out` when given."""
    if simplejpeg is not None:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out, strict=True)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
    if img is None:
        raise ValueError("OpenCV could not decode the JPEG")
    if out is not None:
        if out.shape != img.shape:
            raise ValueError(f"decoded JPEG is {img.shape}, expected {out.shape}")
        out[...] = img
        return out
    return img


def decode_sample(members: dict[str, bytes], frames_out: np.ndarray | None = None,
                  masks_out: np.ndarray | None = None, soft_out: np.ndarray | None = None
                  ) -> dict:
    """Inverse of `encode_sample`. `frames_out` (T, H, W, 3), `masks_out` and `soft_out`
    (T, H, W) uint8 receive the arrays in place (the loader decodes straight into its
    batch); `soft_out` is zeroed for a sample without soft masks."""
    key = members.get("__key__", "?")
    missing = [m for m in MEMBERS if m not in members]
    if missing:
        raise SampleDecodeError(f"sample {key}: missing member(s) {', '.join(missing)}")
    try:
        masks = decode_masks(members[MASKS])
    except Exception as err:
        raise SampleDecodeError(f"sample {key}: masks: {type(err).__name__}: {err}") from None
    t, h, w = masks.shape
    if (frames_out is not None and frames_out.shape != (t, h, w, 3)) or \
            (masks_out is not None and masks_out.shape != (t, h, w)):
        # a set-up problem (clips of different sizes in one batch), not corrupt data
        raise ValueError(f"sample {key}: clip is {(t, h, w, 3)} but the batch holds "
                         f"{(masks_out if frames_out is None else frames_out).shape}; all shard "
                         "sets of one loader need the same clip size")
    try:
        strip = decode_jpeg(members[FRAMES],
                            None if frames_out is None else frames_out.reshape(t * h, w, 3))
        if strip.shape != (t * h, w, 3):
            raise ValueError(f"frame strip is {strip.shape}, masks say {(t * h, w, 3)}")
        meta = json.loads(members[META].decode("utf-8"))
    except Exception as err:
        raise SampleDecodeError(f"sample {key}: {type(err).__name__}: {err}") from None
    soft = None
    if SOFT in members:
        try:
            soft = decode_masks(members[SOFT])
        except Exception as err:
            raise SampleDecodeError(f"sample {key}: soft masks: {type(err).__name__}: "
                                    f"{err}") from None
        if soft.shape != masks.shape:
            raise SampleDecodeError(f"sample {key}: soft masks are {soft.shape}, the label "
                                    f"maps {masks.shape}")
        if soft_out is not None:
            soft_out[...] = soft
            soft = soft_out
        else:
            soft = soft.copy()
    elif soft_out is not None:
        soft_out[...] = 0
    if masks_out is not None:
        masks_out[...] = masks
    return {"__key__": key, "frames": strip.reshape(t, h, w, 3),
            "masks": masks_out if masks_out is not None else masks.copy(), "soft": soft,
            "meta": meta}
