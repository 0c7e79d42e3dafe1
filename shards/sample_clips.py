"""Synthetic clip samples in the contract's shapes, for tests and loader benchmarks.

Frames are smooth, photo-like images (gradients, soft blobs, mild texture) rather than
noise, so JPEG sizes and decode times resemble real 384x384 video frames; masks hold a few
moving elliptical objects.
"""
from __future__ import annotations

import cv2
import numpy as np


def make_clip(rng: np.random.Generator, key: str, size: int = 384, n_objects: int = 3,
              n_frames: int = 3) -> dict:
    h = w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(40, 200, 3).astype(np.float32)
    tilt = rng.uniform(-0.3, 0.3, (2, 3)).astype(np.float32)
    coarse = rng.uniform(-40, 40, (n_frames, 8, 8, 3)).astype(np.float32)
    frames = np.empty((n_frames, h, w, 3), np.uint8)
    masks = np.zeros((n_frames, h, w), np.uint8)
    centres = rng.uniform(0.2, 0.8, (n_objects, 2)) * size
    radii = rng.uniform(0.06, 0.2, (n_objects, 2)) * size
    velocity = rng.uniform(-0.03, 0.03, (n_objects, 2)) * size
    colours = rng.uniform(0, 255, (n_objects, 3)).astype(np.float32)
    for t in range(n_frames):
        # smooth background: gradient + bicubically upsampled coarse field + fine grain
        up = cv2.resize(coarse[t], (w, h), interpolation=cv2.INTER_CUBIC)
        img = base + yy[..., None] * tilt[0] + xx[..., None] * tilt[1] + up
        img += rng.normal(0, 4, (h, w, 1)).astype(np.float32)
        for o in range(n_objects):
            cy, cx = centres[o] + velocity[o] * t
            inside = ((yy - cy) / radii[o, 0]) ** 2 + ((xx - cx) / radii[o, 1]) ** 2 < 1
            masks[t][inside] = o + 1
            img[inside] = 0.7 * colours[o] + 0.3 * img[inside]
        frames[t] = np.clip(img, 0, 255).astype(np.uint8)
    meta = {"set": "synthetic", "video": key.rsplit("-", 1)[0], "frames": list(range(n_frames)),
            "max_skip": 1, "seed": int(rng.integers(1 << 31)),
            "objects": list(range(1, n_objects + 1)),
            "augmentation": {}}
    return {"__key__": key, "frames": frames, "masks": masks, "meta": meta}


def write_synthetic_set(url_dir: str, count: int, size: int = 384, max_count: int = 128,
                        seed: int = 0, progress: bool = True) -> int:
    """Write `count` synthetic clips (8 per pseudo-video) plus a manifest to `url_dir`."""
    from . import console
    from .manifest import Manifest, write_manifest
    from .writer import ShardWriter

    rng = np.random.default_rng(seed)
    with ShardWriter(url_dir, max_count=max_count) as writer:
        for i in console.progress(range(count), desc=f"write {url_dir}", unit="clip",
                                  enabled=progress):
            writer.write(make_clip(rng, f"synthetic{i // 8:05d}-{i:06d}", size=size))
    write_manifest(url_dir, Manifest(shards=writer.infos, config={
        "generator": "shards.sample_clips", "count": count, "size": size, "seed": seed}))
    return count
