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


def _files(store, video: Video, frame: str):
    """A frame's image and annotation files, as an error message names them."""
    if hasattr(store, "image_dir"):
        return (store.image_dir / video.name / f"{frame}.jpg",
                store.mask_dir / video.name / f"{frame}.png")
    return f"{frame}.jpg", f"{frame}.png"


def _size(array: np.ndarray) -> str:
    return f"{array.shape[1]}x{array.shape[0]}"


class VideoFrame:
    """One frame of a video as its clips use it: the id map, decoded when the frame is
    read, and the image, decoded when a kept attempt first needs it (an attempt that is
    retried uses only its masks)."""

    def __init__(self, jpg: bytes, png: bytes, where: str, files):
        self.where, self.files = where, files
        self.ids = decode_ids(png, where)
        self._jpg, self._image = jpg, None

    def image(self) -> np.ndarray:
        if self._image is None:
            image = decode_image(self._jpg, self.where)
            if image.shape[:2] != self.ids.shape:
                raise ValueError(f"{self.where}: mask {self.files[1]} is {_size(self.ids)} but "
                                 f"its frame {self.files[0]} is {_size(image)}; masks must "
                                 "have their frame's size (re-export that annotation)")
            self._image, self._jpg = image, None
        return self._image


class DecodedFrames:
    """Frames (VideoFrame) of one video, shared by the clips a worker makes from it: a frame
    that several clips draw is read and decoded once (about a fifth of the frames of a
    500-clip DAVIS shard: 60 videos of ~70 frames, max skip 10). Holds at most `capacity`
    frames (~1.6 MB each at 480p), dropping the least recently used. Clips only read the
    arrays, so sharing them changes no clip."""

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self._frames: OrderedDict[tuple[str, str], VideoFrame] = OrderedDict()

    def get(self, video: str, frame: str) -> VideoFrame | None:
        found = self._frames.get((video, frame))
        if found is not None:
            self._frames.move_to_end((video, frame))
        return found

    def put(self, video: str, frame: str, decoded: VideoFrame) -> None:
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
    published. An attempt's masks are warped and checked first: its images are decoded and
    warped (the costly part) only if it is kept. `cache`: frames shared with other clips
    of `video` (the same clip with or without)."""
    sampler = TripletSampler(max(1, max_skip // frame_step))
    cache = DecodedFrames() if cache is None else cache
    for attempt in range(ATTEMPTS):
        rng = clip_rng(seed, kind, video.name, round_, attempt)
        indices = sampler.sample(len(video.frames), rng)
        names = [video.frames[i] for i in indices]
        frames = []
        for name in names:
            frame = cache.get(video.name, name)
            if frame is None:
                frame = VideoFrame(*store.read(video.name, name),
                                   f"{kind} video {video.name} frame {name}",
                                   _files(store, video, name))
                cache.put(video.name, name, frame)
            if frames and frame.ids.shape != frames[0].ids.shape:
                for suspect in (frame, frames[0]):  # the error path only: a mask that differs
                    suspect.image()                 # from its own frame is named as such
                raise ValueError(f"{kind} video {video.name}: annotation {frame.files[1]} is "
                                 f"{_size(frame.ids)} but {frames[0].files[1]} is "
                                 f"{_size(frames[0].ids)}; frames of one video must share "
                                 "one size")
            frames.append(frame)
        h, w = frames[0].ids.shape
        clip = video_warps(rng, (w, h), len(names), aug)
        masks = clip.masks([f.ids for f in frames])
        objects = eligible_objects(masks, size_rule)
        if objects or attempt == ATTEMPTS - 1:
            images = clip.images(f.image() for f in frames)  # decoded as warped
            break
    meta = {"source": kind, "video": video.name, "frames": names, "frame_index": indices,
            "max_skip": max_skip, "frame_step": frame_step, "seed": seed, "round": round_,
            "attempt": attempt, "objects": objects, "augment": clip.params}
    return {"__key__": clip_key(video.name, round_), "frames": images, "masks": masks,
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
