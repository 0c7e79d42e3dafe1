"""BL30K read straight from its distribution tar archives, each streamed once.

The corpus is six ~115 GB archives (~700 GB; extracting needs ~1 TB), so a job never
extracts: it streams an archive's members in order (`tarfile` stream mode, through
shards.storage: archives may sit in an object store, read as retried ranged GETs) and
groups them by video. A video's members are contiguous in an archive, so a video is
complete when the stream moves on to the next one.
Memory bound: the encoded bytes of ONE video (~160 JPEG + PNG frames, ~15-25 MB at 768x512)
are held by the reader; the job driver holds those of the few videos a shard needs.
"""
from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Iterator

from shards import storage

from pipelines.sources.base import LayoutError, Video
from pipelines.sources.video_tree import BL30K_LAYOUT

ARCHIVE_LAYOUT = ("tar archives (BL30K_*.tar) whose members are "
                  "[...]/{JPEGImages,Annotations}/<video>/<frame>.{jpg,png}, "
                  "each video's members contiguous")


@dataclass
class MemoryFrames:
    """A FrameStore over frames held in memory: {video: {frame: (jpg bytes, png bytes)}}."""
    frames: dict[str, dict[str, tuple[bytes, bytes]]] = field(default_factory=dict)

    def read(self, video: str, frame: str) -> tuple[bytes, bytes]:
        return self.frames[video][frame]


def list_archives(url: str) -> list[str]:
    """The archive URLs of a BL30K tar source: one .tar, or every *.tar in a directory."""
    if url.endswith(".tar"):
        return [url]
    if not storage.isdir(url):
        raise LayoutError(url, "not a directory", BL30K_LAYOUT)
    names = [n for n in storage.listdir(url) if n.endswith(".tar")]
    if not names:
        raise LayoutError(url, "no *.tar archive and no JPEGImages/ tree", BL30K_LAYOUT)
    return names


def archive_name(url: str) -> str:
    """A short name for an archive (its file stem), used to name its shards."""
    return PurePosixPath(url.rstrip("/")).name.removesuffix(".tar").replace(".", "_")


def _parse(member: str) -> tuple[str, str, str] | None:
    """(kind, video, frame) of an archive member, kind "jpg" or "png"; None if unrelated."""
    parts = PurePosixPath(member).parts
    for i, part in enumerate(parts[:-2]):
        if part in ("JPEGImages", "Annotations") and len(parts) == i + 3:
            stem, _, ext = parts[i + 2].rpartition(".")
            ext = ext.lower()
            if (part, ext) in (("JPEGImages", "jpg"), ("Annotations", "png")):
                return ext, parts[i + 1], stem
    return None


def _complete(url: str, name: str, images: dict, masks: dict) -> tuple[Video, dict] | None:
    missing = [f for f in images if f not in masks]
    if missing:
        raise LayoutError(url, f"video {name}: no annotation for frame {missing[0]} "
                          f"({len(missing)} missing)", ARCHIVE_LAYOUT)
    frames = tuple(sorted(images))
    if len(frames) < 3:
        return None
    return Video(name, frames), {f: (images[f], masks[f]) for f in frames}


def iter_archive_videos(url: str) -> Iterator[tuple[Video, dict[str, tuple[bytes, bytes]]]]:
    """Stream one archive once; yield (video, {frame: (jpg, png)}) per video, in archive
    order, as soon as its last member has been read. Videos under 3 frames are skipped."""
    done: set[str] = set()
    current, images, masks = None, {}, {}
    with storage.open_read(url) as raw, tarfile.open(fileobj=raw, mode="r|") as archive:
        for member in archive:
            parsed = _parse(member.name) if member.isfile() else None
            if parsed is None:
                continue
            kind, video, frame = parsed
            if video != current:
                if current is not None:
                    done.add(current)
                    result = _complete(url, current, images, masks)
                    if result is not None:
                        yield result
                if video in done:
                    raise LayoutError(url, f"members of video {video} are not contiguous "
                                      "(streaming needs each video in one run)", ARCHIVE_LAYOUT)
                current, images, masks = video, {}, {}
            (images if kind == "jpg" else masks)[frame] = archive.extractfile(member).read()
    if current is not None:
        result = _complete(url, current, images, masks)
        if result is not None:
            yield result
