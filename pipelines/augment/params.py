"""The published augmentation parameters (STCN), as data: the one place they are defined.

Geometry is baked into the shards (`StaticAugment`, `VideoAugment`); the cheap photometric
steps and the flip stay online in the trainer (`ONLINE_STATIC`, `ONLINE_VIDEO`), recorded in
every manifest so the trainer applies exactly these.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

OUTPUT_SIZE = 384
#: Fill colour for pixels that come from outside the image (the image-net mean in RGB 0..255).
IMAGE_MEAN_RGB = (124, 116, 104)


@dataclass(frozen=True)
class StaticAugment:
    """Static images -> pseudo clips: one image transformed three times."""
    clip_scale: tuple[float, float] = (0.8, 1.5)     # per clip affine scale (no rotation)
    frame_degrees: float = 20.0                       # per frame rotation, +-
    frame_scale: tuple[float, float] = (0.9, 1.1)     # per frame affine scale
    frame_shear: float = 10.0                         # per frame x shear, +- degrees
    tps_p: float = 0.33                               # probability of a TPS warp per frame
    tps_points: int = 12                              # control points
    tps_std: float = 0.02                             # displacement std, fraction of image size
    size: int = OUTPUT_SIZE                           # resize shorter side, random crop square

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class VideoAugment:
    """DAVIS / YouTubeVOS / BL30K clips."""
    crop_scale: tuple[float, float] = (0.36, 1.0)     # resized crop area fraction, per clip
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # resized crop aspect ratio, per clip
    frame_degrees: float = 15.0                       # per frame rotation, +-
    frame_shear: float = 10.0                         # per frame x shear, +- degrees
    size: int = OUTPUT_SIZE

    def to_dict(self) -> dict:
        return asdict(self)


#: BL30K frames are 768x512 renders: the published loader crops a wider area range.
BL30K_AUGMENT = VideoAugment(crop_scale=(0.25, 1.0))
VIDEO_AUGMENT = VideoAugment()
STATIC_AUGMENT = StaticAugment()

# Left online (see README, section pipelines): cheap per-pixel work that costs nothing on the
# GPU, and that keeps clips varied across epochs although the baked clips repeat.
ONLINE_STATIC = {
    "hflip": {"p": 0.5, "per": "clip"},
    "color_jitter_clip": {"brightness": 0.1, "contrast": 0.05, "saturation": 0.05, "hue": 0.05},
    "color_jitter_frame": {"brightness": 0.1, "contrast": 0.05, "saturation": 0.05, "hue": 0.0},
    "grayscale": {"p": 0.05, "per": "clip"},
}
ONLINE_VIDEO = {
    "hflip": {"p": 0.5, "per": "clip"},
    "color_jitter_clip": {"brightness": 0.1, "contrast": 0.03, "saturation": 0.03, "hue": 0.0},
    "color_jitter_frame": {"brightness": 0.01, "contrast": 0.01, "saturation": 0.01, "hue": 0.0},
    "grayscale": {"p": 0.05, "per": "clip"},
}
