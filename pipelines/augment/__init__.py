"""Geometric augmentation baked into the shards: pure functions of an explicit
`np.random.Generator`, one warp per frame (see `warp.warp_frame`)."""
from pipelines.augment.params import (
                                      BL30K_AUGMENT,
                                      IMAGE_MEAN_RGB,
                                      ONLINE_STATIC,
                                      ONLINE_VIDEO,
                                      OUTPUT_SIZE,
                                      STATIC_AUGMENT,
                                      VIDEO_AUGMENT,
                                      StaticAugment,
                                      VideoAugment,
)
from pipelines.augment.recipes import ClipWarps, augment_static, augment_video, video_warps

__all__ = ["BL30K_AUGMENT", "IMAGE_MEAN_RGB", "ONLINE_STATIC", "ONLINE_VIDEO", "OUTPUT_SIZE",
           "STATIC_AUGMENT", "VIDEO_AUGMENT", "ClipWarps", "StaticAugment", "VideoAugment",
           "augment_static", "augment_video", "video_warps"]
