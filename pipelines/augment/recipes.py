"""The two published augmentation recipes, geometry only (flip and colour stay online).

Each returns (frames (3, S, S, 3) uint8, masks (3, S, S) uint8, parameters) where the
parameters are JSON-ready and recorded in the clip's metadata.
"""
from __future__ import annotations

import numpy as np

from pipelines.augment.geometry import (random_affine, random_crop, random_resized_crop,
                                        resize_matrix, shorter_side_size)
from pipelines.augment.params import IMAGE_MEAN_RGB, StaticAugment, VideoAugment
from pipelines.augment.tps import random_tps_points, tps_displacement
from pipelines.augment.warp import warp_frame


def augment_static(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray,
                   aug: StaticAugment) -> tuple[np.ndarray, np.ndarray, dict]:
    """One image (H, W, 3) and mask (H, W) -> a pseudo clip of three differently warped
    copies: a per clip scale, then per frame affine, shorter side resize, random crop and,
    with probability tps_p, a thin-plate-spline warp."""
    h, w = mask.shape
    clip, clip_params = random_affine(rng, w, h, scale=aug.clip_scale)
    resized_wh = shorter_side_size(w, h, aug.size)
    resize = resize_matrix((w, h), resized_wh)
    frames, masks, frame_params = [], [], []
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
        image_out, mask_out = warp_frame(image, mask, crop @ resize @ frame @ clip, aug.size,
                                         IMAGE_MEAN_RGB, displacement)
        frames.append(image_out)
        masks.append(mask_out)
        frame_params.append(params)
    return (np.stack(frames), np.stack(masks),
            {"clip": {"scale": clip_params["scale"]}, "frames": frame_params})


def augment_video(rng: np.random.Generator, images: list[np.ndarray], masks: list[np.ndarray],
                  aug: VideoAugment) -> tuple[np.ndarray, np.ndarray, dict]:
    """Three frames and masks of one video -> a clip: one resized crop per clip, then a per
    frame rotation and shear."""
    h, w = masks[0].shape
    crop, crop_params = random_resized_crop(rng, w, h, aug.size, aug.crop_scale, aug.crop_ratio)
    frames, out_masks, frame_params = [], [], []
    for image, mask in zip(images, masks):
        if mask.shape != (h, w) or image.shape[:2] != (h, w):
            raise ValueError(f"frames of one video differ in size: {image.shape[:2]} vs {(h, w)}")
        frame, params = random_affine(rng, aug.size, aug.size, degrees=aug.frame_degrees,
                                      shear=aug.frame_shear)
        del params["scale"]  # the video recipe has no per frame scale
        image_out, mask_out = warp_frame(image, mask, frame @ crop, aug.size, IMAGE_MEAN_RGB)
        frames.append(image_out)
        out_masks.append(mask_out)
        frame_params.append(params)
    return np.stack(frames), np.stack(out_masks), {"clip": crop_params, "frames": frame_params}
