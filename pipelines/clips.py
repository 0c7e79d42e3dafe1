"""A clip is a pure function of (source, seed, clip identity).

A clip's identity is (item, round): the item is a video (or a static image), the round j
counts how many clips that item has already given. Its random generator is seeded from
(seed, source kind, item name, round, attempt) alone, so the same clip comes out whichever
worker, task or reading order (directory tree or tar archive) produces it.

Shard sets made from a listed source order their clips round by round, each round visiting
every item once in a seeded random order (`clip_order`): like the published loader's
epochs, and every shard mixes many videos.
"""
from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from functools import lru_cache

import numpy as np

from pipelines.augment import StaticAugment, VideoAugment, augment_static, video_warps
from pipelines.sampling import TripletSampler, eligible_objects
from pipelines.sources import FrameStore, StaticItem, StaticSource, Video, decode_ids, decode_image
from pipelines.sources.base import decode_gray_mask

#: Frame triplets tried per clip before settling for one with no eligible object (published: 5).
ATTEMPTS = 5


def _word(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def clip_rng(seed: int, *parts) -> np.random.Generator:
    """A generator that depends only on the seed and the parts (strings or ints)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed)] + [_word(str(p)) for p in parts]))


def clip_key(name: str, round_: int) -> str:
    """Sample key of round `round_` of item `name` (only [A-Za-z0-9_-]: no dots in keys)."""
    return f"{re.sub(r'[^A-Za-z0-9_-]', '_', name)}-{round_:06d}"


@lru_cache(maxsize=64)
def _round_order(seed: int, kind: str, count: int, round_: int) -> np.ndarray:
    return clip_rng(seed, kind, "order", round_).permutation(count)


def clip_order(seed: int, kind: str, count: int, start: int, stop: int) -> list[tuple[int, int]]:
    """(item index, round) of clips start..stop-1 of a set drawn from `count` items."""
    return [(int(_round_order(seed, kind, count, i // count)[i % count]), i // count)
            for i in range(start, stop)]


def _check_size(store, video: Video, name: str, image: np.ndarray, mask: np.ndarray,
                first: np.ndarray, first_name: str, kind: str) -> None:
    """A mask must match its frame, and frames of one video one another: a clear error
    naming the video and the files otherwise."""
    def files(frame):
        if hasattr(store, "image_dir"):
            return (store.image_dir / video.name / f"{frame}.jpg",
                    store.mask_dir / video.name / f"{frame}.png")
        return f"{frame}.jpg", f"{frame}.png"

    def size(array):
        return f"{array.shape[1]}x{array.shape[0]}"

    jpg, png = files(name)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"{kind} video {video.name}: mask {png} is {size(mask)} but its frame "
                         f"{jpg} is {size(image)}; masks must have their frame's size "
                         "(re-export that annotation)")
    if image.shape[:2] != first.shape[:2]:
        raise ValueError(f"{kind} video {video.name}: frame {jpg} is {size(image)} but frame "
                         f"{files(first_name)[0]} is {size(first)}; frames of one video must "
                         "share one size")


class DecodedFrames:
    """Decoded frames (image, id map) of one video, shared by the clips a worker makes from
    it: a frame that several clips draw is read and decoded once (about a fifth of the
    frames of a 500-clip DAVIS shard: 60 videos of ~70 frames, max skip 10). Holds at most
    `capacity` frames (~1.6 MB each at 480p), dropping the least recently used. Clips only
    read the arrays, so sharing them changes no clip."""

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self._frames: OrderedDict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def get(self, video: str, frame: str) -> tuple[np.ndarray, np.ndarray] | None:
        found = self._frames.get((video, frame))
        if found is not None:
            self._frames.move_to_end((video, frame))
        return found

    def put(self, video: str, frame: str, decoded: tuple[np.ndarray, np.ndarray]) -> None:
        self._frames[video, frame] = decoded
        if len(self._frames) > self.capacity:
            self._frames.popitem(last=False)


def make_video_clip(store: FrameStore, video: Video, round_: int, *, kind: str, seed: int,
                    max_skip: int, frame_step: int, aug: VideoAugment, size_rule: bool,
                    cache: DecodedFrames | None = None) -> dict:
    """Round `round_` clip of `video`: a triplet by the published rule with J =
    max_skip // frame_step listed frames (TripletSampler: gaps up to J + 1), augmented;
    retried with new frames and a new augmentation (a new generator per attempt) until
    frame 0 holds an eligible object, up to ATTEMPTS; then kept with "objects": [], as
    published. An attempt's masks are warped and checked before its images. `cache`: decoded frames shared with other clips of `video` (the same clip
    with or without)."""
    sampler = TripletSampler(max(1, max_skip // frame_step))
    cache = DecodedFrames() if cache is None else cache
    for attempt in range(ATTEMPTS):
        rng = clip_rng(seed, kind, video.name, round_, attempt)
        indices = sampler.sample(len(video.frames), rng)
        names = [video.frames[i] for i in indices]
        decoded = []
        for name in names:
            found = cache.get(video.name, name)
            if found is None:
                jpg, png = store.read(video.name, name)
                where = f"{kind} video {video.name} frame {name}"
                found = decode_image(jpg, where), decode_ids(png, where)
                _check_size(store, video, name, *found, (decoded or [found])[0][0],
                            names[0], kind)
                cache.put(video.name, name, found)
            decoded.append(found)
        h, w = decoded[0][1].shape
        clip = video_warps(rng, (w, h), len(names), aug)
        masks = clip.masks([d[1] for d in decoded])
        objects = eligible_objects(masks, size_rule)
        if objects or attempt == ATTEMPTS - 1:  # the images' warps (the costly part) only
            frames = clip.images([d[0] for d in decoded])  # for the clip that is kept
            break
    params = clip.params
    meta = {"source": kind, "video": video.name, "frames": names, "frame_index": indices,
            "max_skip": max_skip, "frame_step": frame_step, "seed": seed, "round": round_,
            "attempt": attempt, "objects": objects, "augment": params}
    return {"__key__": clip_key(video.name, round_), "frames": frames, "masks": masks,
            "meta": meta}


def make_static_clip(source: StaticSource, item: StaticItem, round_: int, *, seed: int,
                     aug: StaticAugment) -> dict:
    """Round `round_` pseudo clip of a static image (single object, id 1), with its 8-bit
    soft masks ("soft": frame 0's is what the value encoder sees, as published)."""
    rng = clip_rng(seed, "static", item.name, round_)
    jpg, png = source.read(item)
    image = decode_image(jpg, str(item.image))
    mask = decode_gray_mask(png, str(item.mask))
    if mask.shape != image.shape[:2]:
        raise ValueError(f"{item.mask}: mask is {mask.shape}, image {item.image} is "
                         f"{image.shape[:2]}")
    frames, masks, soft, params = augment_static(rng, image, mask, aug)
    meta = {"source": "static", "video": item.name, "frames": [item.image.name] * 3,
            "frame_index": [0, 0, 0], "max_skip": 0, "seed": seed, "round": round_,
            "objects": eligible_objects(masks), "augment": params}
    return {"__key__": clip_key(item.name, round_), "frames": frames, "masks": masks,
            "soft": soft, "meta": meta}
