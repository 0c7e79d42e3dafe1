"""A PNG contact sheet of clips for a person to check a shard set by eye (tools/inspect_shards).

One block per clip: a header with the clip key, its source video, the frames it took
(names and indices), the clip-level augmentation parameters and a legend (one colour
swatch per object id, marking the objects the clip was made for); then the frames,
each captioned with its frame and its own augmentation parameters, with every object
drawn as a translucent fill plus a solid outline in its colour. Overlays are drawn at
thumbnail size so that outlines stay visible however much the frame is reduced.
"""
from __future__ import annotations

import itertools
import json

import cv2
import numpy as np

from . import storage
from .images import object_colour
from .reader import iter_samples

FONT = cv2.FONT_HERSHEY_SIMPLEX
FONT_SCALE = 0.4
LINE_HEIGHT = 14
CHAR_WIDTH = 7.2          # of FONT at FONT_SCALE, for wrapping
MARGIN = 4
FILL_ALPHA = 0.45
OUTLINE_PX = 2

def overlay(frame: np.ndarray, mask: np.ndarray, alpha: float = FILL_ALPHA,
            outline: int = OUTLINE_PX) -> np.ndarray:
    """Frame (H, W, 3) RGB with each object of the label map ``mask`` (H, W) filled
    translucently and outlined (``outline`` pixels, inside its border) in its colour."""
    out = frame.astype(np.float32)
    kernel = np.ones((2 * outline + 1, 2 * outline + 1), np.uint8)
    for object_id in np.unique(mask):
        if object_id == 0:
            continue
        inside = mask == object_id
        colour = object_colour(object_id).astype(np.float32)
        out[inside] = (1 - alpha) * out[inside] + alpha * colour
        edge = inside & ~cv2.erode(inside.astype(np.uint8), kernel, borderValue=0).astype(bool)
        out[edge] = colour
    return out.astype(np.uint8)


def _text_lines(text: str, width_px: int) -> list[str]:
    """Wrap ``text`` at spaces to lines that fit ``width_px``."""
    limit = max(8, int((width_px - 2 * MARGIN) / CHAR_WIDTH))
    lines, line = [], ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > limit:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    return [piece[i:i + limit] for piece in lines for i in range(0, max(len(piece), 1), limit)]


def _text_block(lines: list[str], width: int) -> np.ndarray:
    block = np.full((LINE_HEIGHT * len(lines) + MARGIN, width, 3), 255, np.uint8)
    for i, line in enumerate(lines):
        cv2.putText(block, line, (MARGIN, LINE_HEIGHT * (i + 1) - 2), FONT, FONT_SCALE,
                    (0, 0, 0), 1, cv2.LINE_AA)
    return block


def _value(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return " ".join(f"{k} {_value(v)}" for k, v in value.items())
    return str(value)


def describe(sample: dict) -> dict:
    """What a person needs to trace a clip back: key, source, video, frames and indices,
    clip-level and per-frame augmentation parameters, objects. Works on any meta (static
    clips, older shards): missing fields are left out."""
    meta = sample.get("meta", {})
    count = len(sample["frames"])
    augment = dict(meta.get("augment") or {})
    per_frame = [{} for _ in range(count)]
    # per-frame parameters are lists with one entry per frame (dicts or plain values)
    for name, value in list(augment.items()):
        if isinstance(value, list) and len(value) == count:
            for i, item in enumerate(value):
                per_frame[i].update(item if isinstance(item, dict) else {name: item})
            del augment[name]
    present = sorted(int(i) for i in np.unique(np.asarray(sample["masks"])) if i != 0)
    frames = meta.get("frames") or [None] * count
    indices = meta.get("frame_index") or [None] * count
    return {"key": sample["__key__"], "source": meta.get("source"), "video": meta.get("video"),
            "frames": list(frames), "frame_index": list(indices),
            "max_skip": meta.get("max_skip"), "round": meta.get("round"),
            "clip_augment": augment, "frame_augment": per_frame,
            "objects_used": meta.get("objects"), "objects_present": present}


def describe_line(sample: dict) -> str:
    """One line per clip for the console: the description as compact JSON."""
    return json.dumps(describe(sample), separators=(",", ":"), default=str)


def _legend(info: dict, width: int) -> np.ndarray:
    """Colour swatches with "object N" labels, wrapped over as many lines as needed;
    objects present but not chosen for the clip are marked "(not used)"."""
    used = info["objects_used"]
    entries = [(object_id, f"object {object_id}"
                + ("" if used is None or object_id in used else " (not used)"))
               for object_id in info["objects_present"]]
    placed, x, line = [], MARGIN, 0
    for object_id, label in entries:
        needed = 14 + int(CHAR_WIDTH * len(label)) + 10
        if x > MARGIN and x + needed > width:
            x, line = MARGIN, line + 1
        placed.append((object_id, label, x, line))
        x += needed
    block = np.full((LINE_HEIGHT * (line + 1) + MARGIN, width, 3), 255, np.uint8)
    if not entries:
        cv2.putText(block, "no objects", (MARGIN, LINE_HEIGHT - 2), FONT, FONT_SCALE, (0, 0, 0), 1,
                    cv2.LINE_AA)
    for object_id, label, x, line in placed:
        top = LINE_HEIGHT * line
        colour = tuple(int(c) for c in object_colour(object_id))
        cv2.rectangle(block, (x, top + 2), (x + 10, top + 12), colour, -1)
        cv2.rectangle(block, (x, top + 2), (x + 10, top + 12), (0, 0, 0), 1)
        cv2.putText(block, label, (x + 14, top + LINE_HEIGHT - 2), FONT, FONT_SCALE, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return block


def clip_block(sample: dict, thumb: int) -> np.ndarray:
    """The header, legend and captioned overlaid frames of one clip."""
    info = describe(sample)
    count = len(sample["frames"])
    width = thumb * count
    where = " ".join(f"{k} {info[k]}" for k in ("source", "video", "max_skip", "round")
                     if info[k] is not None)
    frames = ", ".join(f"{n} (index {i})" for n, i in zip(info["frames"], info["frame_index"])
                       if n is not None or i is not None)
    header = [info["key"]] + _text_lines(where, width)
    if frames:
        header += _text_lines("frames " + frames, width)
    if info["clip_augment"]:
        header += _text_lines("clip augment: " + _value(info["clip_augment"]), width)
    parts = [_text_block(header, width), _legend(info, width)]
    captions, tiles = [], []
    for i, (frame, mask) in enumerate(zip(sample["frames"], sample["masks"])):
        small = cv2.resize(np.asarray(frame), (thumb, thumb), interpolation=cv2.INTER_AREA)
        labels = cv2.resize(np.asarray(mask), (thumb, thumb), interpolation=cv2.INTER_NEAREST)
        tiles.append(overlay(small, labels))
        name = info["frames"][i] if i < len(info["frames"]) else None
        captions.append(_text_lines(f"{i}: {name if name is not None else ''} "
                                    + _value(info["frame_augment"][i]), thumb))
    rows = max(len(c) for c in captions)
    parts.append(np.concatenate([_text_block(c + [""] * (rows - len(c)), thumb) for c in captions], axis=1))
    parts.append(np.concatenate(tiles, axis=1))
    return np.concatenate(parts, axis=0)


def contact_sheet(url_dir: str, count: int = 8, thumb: int = 192, skip: int = 0,
                  on_clip=None) -> np.ndarray:
    """RGB image: one block per clip (the first ``count`` clips after ``skip``, manifest
    order). ``on_clip(sample)`` is called for each clip shown (e.g. to print it)."""
    blocks = []
    for sample in itertools.islice(iter_samples(url_dir), skip, skip + count):
        if on_clip is not None:
            on_clip(sample)
        blocks.append(clip_block(sample, thumb))
    if not blocks:
        raise ValueError(f"{url_dir}: no samples to show (the set holds at most {skip} clips; "
                         "lower --skip)")
    width = max(b.shape[1] for b in blocks)
    blocks = [np.pad(b, ((0, 8), (0, width - b.shape[1]), (0, 0)), constant_values=200) for b in blocks]
    return np.concatenate(blocks, axis=0)


def write_contact_sheet(url_dir: str, out_url: str, count: int = 8, thumb: int = 192,
                        skip: int = 0, on_clip=None) -> str:
    sheet = contact_sheet(url_dir, count, thumb, skip, on_clip)
    ok, png = cv2.imencode(".png", cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("PNG encoding of the contact sheet failed")
    storage.write_bytes_atomic(out_url, png.tobytes())
    return out_url
