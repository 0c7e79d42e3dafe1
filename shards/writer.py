"""Writing shards: one complete tar at a time, atomically.

`write_shard` is the unit the preprocessing job driver uses (it names shards itself, which
makes work units resumable); `ShardWriter` rolls over to a new shard by count and size for
simple sequential producers.
"""
from __future__ import annotations

import hashlib
import tarfile
from typing import Iterable

from . import codec, storage
from .manifest import ShardInfo

DEFAULT_MAX_COUNT = 1000
DEFAULT_MAX_BYTES = 256 << 20


def _member_bytes(name: str, data: bytes) -> bytes:
    """One tar member: header (fixed owner, mode and mtime, so the same samples always give
    byte-identical shards) + data padded to the 512-byte block size."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0
    pad = -len(data) % tarfile.BLOCKSIZE
    return info.tobuf(format=tarfile.PAX_FORMAT) + data + tarfile.NUL * pad


def sample_tar_bytes(members: dict[str, bytes]) -> bytes:
    """The tar members of one encoded sample (see codec), in schema order."""
    key = members["__key__"]
    missing = [m for m in codec.MEMBERS if m not in members]
    if missing:
        raise ValueError(f"encoded sample {key!r} lacks {', '.join(missing)}; encode samples "
                         "with shards.encode_sample")
    return b"".join(_member_bytes(f"{key}.{m}", members[m]) for m in codec.WRITE_ORDER
                    if m in members)


# Two zero blocks end a tar archive. We stop there instead of padding to tarfile's
# 10 KiB record size, so a shard's size is exactly the sum of its samples plus this.
END_OF_ARCHIVE = tarfile.NUL * (2 * tarfile.BLOCKSIZE)


def tar_bytes(encoded: Iterable[dict[str, bytes]]) -> tuple[bytes, int]:
    """(tar archive bytes, sample count) for already encoded samples (see codec)."""
    parts, seen = [], set()
    for members in encoded:
        key = members["__key__"]
        if key in seen:
            raise ValueError(f"sample key {key!r} appears twice in one shard")
        seen.add(key)
        parts.append(sample_tar_bytes(members))
    return b"".join(parts) + END_OF_ARCHIVE, len(parts)


def _write_tar(url: str, data: bytes, count: int) -> ShardInfo:
    storage.write_bytes_atomic(url, data)
    return ShardInfo(name=url.rstrip("/").rsplit("/", 1)[-1], count=count, bytes=len(data),
                     sha256=hashlib.sha256(data).hexdigest())


def write_shard(url: str, samples: Iterable[dict], jpeg_quality: int = codec.DEFAULT_JPEG_QUALITY
                ) -> ShardInfo:
    """Encode `samples` and write them as ONE complete tar shard at `url` (atomic: readers
    never see a partial shard). Returns the ShardInfo to put into the manifest."""
    return write_encoded_shard(url, (codec.encode_sample(s, jpeg_quality) for s in samples))


def write_encoded_shard(url: str, encoded: Iterable[dict[str, bytes]]) -> ShardInfo:
    """`write_shard` for samples already encoded with `codec.encode_sample` (e.g. by worker
    processes, so the process that assembles shards does no encoding). Same bytes as
    `write_shard` of the same samples."""
    if not url.endswith(".tar"):
        raise ValueError(f"shard URL {url!r} must end with .tar")
    data, count = tar_bytes(encoded)
    return _write_tar(url, data, count)


class ShardWriter:
    """Write samples into `<url_dir>/<prefix>-NNNNNN.tar`, starting a new shard when the
    current one holds `max_count` samples or would pass `max_bytes`.

        with ShardWriter("s3://bucket/davis", max_count=500) as w:
            for s in samples:
                w.write(s)
        infos = w.infos            # also returned by close()

    It writes no manifest (several writers may feed one set): build one from the infos with
    `Manifest(shards=infos, config=...)` and `write_manifest`.
    """

    def __init__(self, url_dir: str, prefix: str = "shard", max_count: int = DEFAULT_MAX_COUNT,
                 max_bytes: int = DEFAULT_MAX_BYTES, start_index: int = 0,
                 jpeg_quality: int = codec.DEFAULT_JPEG_QUALITY):
        if max_count < 1 or max_bytes < 1:
            raise ValueError("max_count and max_bytes must be positive")
        self.url_dir, self.prefix = url_dir, prefix
        self.max_count, self.max_bytes, self.jpeg_quality = max_count, max_bytes, jpeg_quality
        self.index = start_index
        self.infos: list[ShardInfo] = []
        self._pending: list[bytes] = []  # tar bytes of each sample
        self._pending_bytes = 0
        self._keys: set[str] = set()
        self._closed = False

    def write(self, sample: dict) -> None:
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        members = codec.encode_sample(sample, self.jpeg_quality)
        if members["__key__"] in self._keys:
            raise ValueError(f"sample key {members['__key__']!r} was already written")
        self._keys.add(members["__key__"])
        data = sample_tar_bytes(members)
        if self._pending and self._pending_bytes + len(data) + len(END_OF_ARCHIVE) > self.max_bytes:
            self._flush()
        self._pending.append(data)
        self._pending_bytes += len(data)
        if len(self._pending) >= self.max_count:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        data, count = b"".join(self._pending) + END_OF_ARCHIVE, len(self._pending)
        url = storage.join(self.url_dir, f"{self.prefix}-{self.index:06d}.tar")
        self.infos.append(_write_tar(url, data, count))
        self.index += 1
        self._pending, self._pending_bytes = [], 0

    def close(self) -> list[ShardInfo]:
        if not self._closed:
            self._flush()
            self._closed = True
        return list(self.infos)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            # Do not write a last shard from a failed producer; what was flushed is complete.
            self._closed = True
