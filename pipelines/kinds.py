"""Source kinds as data: what the shard job and the plan need to know about a kind of source.

A source kind (static, davis, youtube, bl30k, or one you add) is one `SourceKind` record in
the `KINDS` registry: how to open its data, which items its clips draw from, how a clip is
made, the augmentation baked in and the online one recorded for the trainer, and the sizes
`tools/make_shards plan` works with. The job (`pipelines.job`) and the plan
(`pipelines.plan`) look a kind up by name here and never compare kind names; adding a kind
is one `register_kind` call:

    register_kind(SourceKind("mine", open=open_mine, items=lambda s: s.videos,
                             make_clip=video_clip, describe=describe_videos,
                             augment=VIDEO_AUGMENT, online=ONLINE_VIDEO))
    run_job(JobConfig("mine", "data/mine", "shards/mine/skip5", clips=1000, max_skip=5))
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipelines.augment import (
    BL30K_AUGMENT,
    ONLINE_STATIC,
    ONLINE_VIDEO,
    STATIC_AUGMENT,
    VIDEO_AUGMENT,
)
from pipelines.clips import make_static_clip, make_video_clip
from pipelines.sources import (
    archive_name,
    list_archives,
    open_bl30k_tree,
    open_davis,
    open_static,
    open_youtube,
)


@dataclass(frozen=True)
class SourceKind:
    """One kind of source. Functions get the job's `JobConfig` (any of its fields)."""
    name: str
    #: (job) -> a listed source (a FrameStore whose `items` the clips draw from) or a list
    #: of tar archive URLs to stream once each (then clips come per video, --clips-per-video)
    open: Callable[[Any], Any]
    #: (listed source) -> the items clip i draws from (videos, or images), in a fixed order
    items: Callable[[Any], Any]
    #: (kind, store, item, round, job, cache) -> the sample dict of round `round` of `item`,
    #: reading its bytes from `store` (the listed source, or a streamed video's frames);
    #: `cache` (pipelines.clips.DecodedFrames, or None) is shared by the clips a worker makes
    #: of one item in a row, so a frame they share is decoded once (free to ignore)
    make_clip: Callable[..., dict]
    #: (job, source) -> what the manifest's config records about the source's items
    describe: Callable[[Any, Any], dict]
    augment: Any              # baked recipe (its to_dict() goes in the manifest)
    online: dict              # the trainer's online steps, recorded in the manifest
    video: bool = True        # items are videos: --max-skip and --clips-per-video apply
    size_rule: bool = False   # BL30K's object-size rule picks the eligible objects
    subset: bool = False      # takes --subset (published list | all | FILE)
    archives: bool = False    # may come as tar archives (the plan prints --clips-per-video)
    #: training videos (images) of the full set, and measured bytes per 384x384 clip
    #: (tools/make_shards plan)
    plan_items: int = 1
    bytes_per_clip: int = 65_000


#: The registered kinds by name, in registration order.
KINDS: dict[str, SourceKind] = {}


def register_kind(kind: SourceKind, *, replace: bool = False) -> SourceKind:
    """Add `kind` to the registry (`replace=True` to redefine a name)."""
    if kind.name in KINDS and not replace:
        raise ValueError(f"source kind {kind.name!r} is already registered")
    KINDS[kind.name] = kind
    return kind


def source_kind(name: str) -> SourceKind:
    """The registered kind `name`; ValueError naming the known ones otherwise."""
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown source kind {name!r}; expected one of {tuple(KINDS)}") from None


class PerKind(Mapping):
    """A live {kind name: field} view of the registry (kinds registered later included)."""

    def __init__(self, field: str):
        self.field = field

    def __getitem__(self, name: str):
        return getattr(KINDS[name], self.field)

    def __iter__(self):
        return iter(KINDS)

    def __len__(self) -> int:
        return len(KINDS)

    def __repr__(self) -> str:
        return repr(dict(self))


# ------------------------------------------------------------- parts the built-in kinds share

def video_clip(kind: SourceKind, store, video, round_: int, job, cache=None) -> dict:
    """A video kind's clip (pipelines.clips.make_video_clip); YouTubeVOS's frame step (its
    listed frames are 5 raw frames apart) comes from its reader."""
    return make_video_clip(store, video, round_, kind=kind.name, seed=job.seed,
                           max_skip=job.max_skip, frame_step=getattr(store, "frame_step", 1),
                           aug=kind.augment, size_rule=kind.size_rule, cache=cache)


def static_clip(kind: SourceKind, store, item, round_: int, job, cache=None) -> dict:
    """A static image's clip (each image is drawn about once per unit: nothing to share)."""
    return make_static_clip(store, item, round_, seed=job.seed, aug=kind.augment)


def describe_videos(job, source) -> dict:
    """Archives by name, or the number of videos and those left out as too short."""
    if isinstance(source, list):
        return {"archives": [archive_name(a) for a in source]}
    return {"videos": len(source.videos),
            "too_short_videos": list(getattr(source, "too_short", ()))}


def describe_listed_videos(job, source) -> dict:
    """describe_videos plus which videos --subset chose (not where its list file was)."""
    return {**describe_videos(job, source),
            "subset": job.subset if job.subset in ("published", "all") else "file",
            "video_names_sha256": hashlib.sha256(
                "\n".join(v.name for v in source.videos).encode()).hexdigest()}


def describe_images(job, source) -> dict:
    return {"images": source.sets, "items": len(source.items)}


def _open_bl30k(job):
    """An extracted tree (JPEGImages/ under SOURCE or SOURCE/BL30K), else tar archives."""
    root = Path(job.source)
    if "://" in job.source or job.source.endswith(".tar") or not (
            (root / "JPEGImages").is_dir() or (root / "BL30K" / "JPEGImages").is_dir()):
        return list_archives(job.source)
    return open_bl30k_tree(job.source)


def _videos(source):
    return source.videos


# ------------------------------------------------------------------------- the built-in kinds
# plan_items: the published train lists (DAVIS 2017 train, the 3464 of 3471 YouTubeVOS videos
# the authors kept) and the BL30K release. bytes_per_clip: 384x384 clips (3 JPEG frames q90 +
# masks + meta + tar headers), measured with make_shards on the synthetic sets at their real
# sizes (80 clips each, max skip 25; README, section pipelines). Real footage has more texture
# than the synthetic scenes: after a first real run, pass --bytes-per-clip (bytes / clips).
# Registration order is the order `make_shards plan` lists them in.

register_kind(SourceKind(
    "static", open=lambda job: open_static(job.source, job.static_sets),
    items=lambda source: source.items, make_clip=static_clip, describe=describe_images,
    augment=STATIC_AUGMENT, online=ONLINE_STATIC, video=False, plan_items=1,
    bytes_per_clip=70_000))
register_kind(SourceKind(
    "bl30k", open=_open_bl30k, items=_videos, make_clip=video_clip,
    describe=describe_videos, augment=BL30K_AUGMENT, online=ONLINE_VIDEO, size_rule=True,
    archives=True, plan_items=29_989, bytes_per_clip=66_000))
register_kind(SourceKind(
    "davis", open=lambda job: open_davis(job.source, job.subset), items=_videos,
    make_clip=video_clip, describe=describe_listed_videos, augment=VIDEO_AUGMENT,
    online=ONLINE_VIDEO, subset=True, plan_items=60, bytes_per_clip=65_000))
register_kind(SourceKind(
    "youtube", open=lambda job: open_youtube(job.source, job.subset), items=_videos,
    make_clip=video_clip, describe=describe_listed_videos, augment=VIDEO_AUGMENT,
    online=ONLINE_VIDEO, subset=True, plan_items=3_464, bytes_per_clip=60_000))
