"""The two published augmentation recipes, geometry only (flip and colour stay online).

Each step keeps the published canvas and fill (see `warp.warp_frame`: the whole chain is
still one warp per frame). `augment_video` returns (frames (3, S, S, 3) uint8, id masks
(3, S, S) uint8, parameters); `augment_static` also returns the 8-bit soft masks (3, S, S)
its ids are thresholded from. The parameters are JSON-ready and recorded in the clip's
metadata; "fill" is each frame's share of fill pixels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from shards.images import shorter_side_size

from pipelines.augment.geometry import (
    random_affine,
    random_crop,
    random_resized_crop,
    resize_matrix,
)
from pipelines.augment.params import IMAGE_MEAN_RGB, StaticAugment, VideoAugment
from pipelines.augment.tps import random_tps_points, tps_displacement
from pipelines.augment.warp import BLACK, FrameWarp, Step, warp_frame

#: A soft mask value above this is the object: mask > 0.5 on the 0..1 scale (published).
SOFT_THRESHOLD = 127


def static_steps(clip: np.ndarray, frame: np.ndarray, crop: np.ndarray, wh: tuple[int, int],
                 size: int) -> tuple[Step, ...]:
    """The static chain's canvases: the per clip and per frame affines keep the image's
    size and fill with the mean, the resize to shorter side `size` reads nothing outside,
    the crop pads with the mean (the TPS warp after them fills black)."""
    resized_wh = shorter_side_size(*wh, size)
    return (Step(clip, wh, IMAGE_MEAN_RGB), Step(frame, wh, IMAGE_MEAN_RGB),
            Step(resize_matrix(wh, resized_wh), wh, None),
            Step(crop, resized_wh, IMAGE_MEAN_RGB))


def video_steps(crop: np.ndarray, frame: np.ndarray, wh: tuple[int, int], size: int
                ) -> tuple[Step, ...]:
    """The video chain's canvases: the resized crop lies inside the frame; the per frame
    rotation/shear works on the size x size crop and fills outside it with the mean."""
    return Step(crop, wh, IMAGE_MEAN_RGB), Step(frame, (size, size), IMAGE_MEAN_RGB)


def augment_static(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray,
                   aug: StaticAugment) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """One image (H, W, 3) and its 8-bit saliency mask (H, W, 0..255) -> a pseudo clip of
    three differently warped copies: a per clip scale, then per frame affine, shorter side
    resize, random crop and, with probability tps_p, a thin-plate-spline warp.

    The mask is warped bicubically as 8-bit values (the published soft mask); the id masks
    are 1 where it is above SOFT_THRESHOLD. Returns (frames, ids, soft masks, parameters)."""
    h, w = mask.shape
    if mask.max() == 1:  # a 0/1 map would never pass the 0.5 threshold: a caller's mistake
        raise ValueError("augment_static takes the 8-bit mask (0..255), got a 0/1 map")
    clip, clip_params = random_affine(rng, w, h, scale=aug.clip_scale)
    resized_wh = shorter_side_size(w, h, aug.size)
    frames, softs, frame_params = [], [], []
    for _ in range(3):
        frame, params = random_affine(rng, w, h, degrees=aug.frame_degrees,
                                      scale=aug.frame_scale, shear=aug.frame_shear)
        crop, crop_params = random_crop(rng, *resized_wh, aug.size)
        params.update(crop_params)
        displacement = None
        params["tps"] = bool(rng.random() < aug.tps_p)
        if params["tps"]:
            source, dest = random_tps_points(rng, aug.tps_points, aug.tps_std)
            params["tps_shift"] = float(np.abs(dest - source).max())
            displacement = tps_displacement(source, dest, aug.size)
        out = warp_frame(image, static_steps(clip, frame, crop, (w, h), aug.size), aug.size,
                         soft=mask, displacement=displacement, displacement_fill=BLACK)
        params["fill"] = round(out.fill_fraction, 5)
        frames.append(out.image)
        softs.append(out.soft)
        frame_params.append(params)
    soft = np.stack(softs)
    return (np.stack(frames), (soft > SOFT_THRESHOLD).astype(np.uint8), soft,
            {"clip": {"scale": clip_params["scale"]}, "frames": frame_params})


@dataclass(frozen=True)
class ClipWarps:
    """One video clip's geometry: a FrameWarp per frame, the parameters its metadata records,
    and the frame size (width, height) it was drawn for."""
    warps: tuple[FrameWarp, ...]
    params: dict
    wh: tuple[int, int]

    def _check(self, arrays) -> None:
        w, h = self.wh
        for array in arrays:
            if array.shape[:2] != (h, w):
                raise ValueError(f"frames of one video differ in size: {array.shape[:2]} vs "
                                 f"{(h, w)}")

    def masks(self, masks: list[np.ndarray]) -> np.ndarray:
        """Id masks (H, W) -> (T, S, S) uint8."""
        self._check(masks)
        out = np.empty((len(self.warps), self.warps[0].size, self.warps[0].size), np.uint8)
        for warp, mask, dst in zip(self.warps, masks, out):
            warp.ids(mask, dst)
        return out

    def images(self, images: Iterable[np.ndarray]) -> np.ndarray:
        """RGB frames (H, W, 3) -> (T, S, S, 3) uint8. `images` may be lazy (a generator
        that decodes each frame): each is then warped while still in the CPU's cache (a
        480p frame is 1.2 MB; decoding all three first cost ~0.2 ms per frame, measured)."""
        size = self.warps[0].size
        out = np.empty((len(self.warps), size, size, 3), np.uint8)
        for warp, image, dst in zip(self.warps, images, out):
            self._check([image])
            warp.image(image, dst)
        return out


def video_warps(rng: np.random.Generator, wh: tuple[int, int], frames: int,
                aug: VideoAugment) -> ClipWarps:
    """The geometry of a clip of `frames` frames of size wh = (width, height): one resized
    crop per clip, then a per frame rotation and shear (all of the clip's draws from `rng`)."""
    w, h = wh
    crop, crop_params = random_resized_crop(rng, w, h, aug.size, aug.crop_scale, aug.crop_ratio)
    warps, frame_params = [], []
    for _ in range(frames):
        frame, params = random_affine(rng, aug.size, aug.size, degrees=aug.frame_degrees,
                                      shear=aug.frame_shear)
        del params["scale"]  # the video recipe has no per frame scale
        warp = FrameWarp(video_steps(crop, frame, wh, aug.size), aug.size)
        params["fill"] = round(warp.fill_fraction, 5)
        warps.append(warp)
        frame_params.append(params)
    return ClipWarps(tuple(warps), {"clip": crop_params, "frames": frame_params}, wh)


def augment_video(rng: np.random.Generator, images: list[np.ndarray], masks: list[np.ndarray],
                  aug: VideoAugment) -> tuple[np.ndarray, np.ndarray, dict]:
    """Three frames and masks of one video -> a clip: one resized crop per clip, then a per
    frame rotation and shear (video_warps)."""
    h, w = masks[0].shape
    clip = video_warps(rng, (w, h), len(masks), aug)
    return clip.images(images), clip.masks(masks), clip.params
