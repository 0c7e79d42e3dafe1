"""A PNG contact sheet of clips (frames with mask overlays and keys) for a person to check
a shard set by eye (tools/inspect_shards)."""
from __future__ import annotations

import itertools

import cv2
import numpy as np

from . import storage
from .reader import iter_samples

LABEL_HEIGHT = 18


def palette(n: int = 256) -> np.ndarray:
    """(n, 3) RGB colours, the DAVIS/PASCAL label palette (id 0 black)."""
    colours = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        colours[i] = (r, g, b)
    return colours


def overlay(frame: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Frame (H, W, 3) RGB with objects tinted in their palette colour and outlined."""
    colours = palette()[mask]
    out = frame.astype(np.float32)
    fg = mask > 0
    out[fg] = (1 - alpha) * out[fg] + alpha * colours[fg]
    out = out.astype(np.uint8)
    edges = cv2.morphologyEx(mask, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
    out[edges] = colours[edges] | 64
    return out


def clip_row(sample: dict, thumb: int) -> np.ndarray:
    tiles = []
    for frame, mask in zip(sample["frames"], sample["masks"]):
        tile = overlay(frame, mask)
        tiles.append(cv2.resize(tile, (thumb, thumb), interpolation=cv2.INTER_AREA))
    row = np.concatenate(tiles, axis=1)
    label = np.full((LABEL_HEIGHT, row.shape[1], 3), 255, np.uint8)
    objects = sample["meta"].get("objects", sorted(set(np.unique(sample["masks"])) - {0}))
    text = f"{sample['__key__']}  objects {list(objects)}"
    cv2.putText(label, text[:80], (4, LABEL_HEIGHT - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([label, row], axis=0)


def contact_sheet(url_dir: str, count: int = 8, thumb: int = 192, skip: int = 0) -> np.ndarray:
    """RGB image: one row per clip (the first `count` clips after `skip`, manifest order)."""
    rows = [clip_row(s, thumb) for s in itertools.islice(iter_samples(url_dir), skip, skip + count)]
    if not rows:
        raise ValueError(f"{url_dir}: no samples to show")
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate(rows, axis=0)


def write_contact_sheet(url_dir: str, out_url: str, count: int = 8, thumb: int = 192,
                        skip: int = 0) -> str:
    sheet = contact_sheet(url_dir, count, thumb, skip)
    ok, png = cv2.imencode(".png", cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("PNG encoding of the contact sheet failed")
    storage.write_bytes_atomic(out_url, png.tobytes())
    return out_url
