"""Source readers, one per data set layout (see README section pipelines)."""
from pipelines.sources.base import (
    FrameStore,
    LayoutError,
    Video,
    decode_ids,
    decode_image,
)
from pipelines.sources.bl30k_tar import (
    MemoryFrames,
    archive_name,
    iter_archive_videos,
    list_archives,
)
from pipelines.sources.static import STATIC_SETS, StaticItem, StaticSource, open_static
from pipelines.sources.video_tree import (
    SUBSET_HELP,
    VideoTree,
    open_bl30k_tree,
    open_davis,
    open_youtube,
)

__all__ = ["FrameStore", "LayoutError", "Video", "decode_ids",
           "decode_image", "MemoryFrames", "archive_name", "iter_archive_videos",
           "list_archives", "STATIC_SETS", "StaticItem", "StaticSource", "open_static",
           "SUBSET_HELP", "VideoTree", "open_bl30k_tree", "open_davis", "open_youtube"]
