"""A node-local, size-bounded cache of remote shards, shared by every rank and worker.

Layout: `DIR/<sha256>.tar` (content-addressed: the same shard from a moved set is a hit),
`DIR/<sha256>.lock` (held exclusively while one process downloads that shard, so a node
downloads each shard once), `DIR/.evict.lock` (one evictor at a time).

A reader holds a shared `flock` on the cached file for as long as it reads it; eviction
takes an exclusive non-blocking lock first and skips the file when that fails, so a shard
being read is never evicted. Eviction is least recently used (file mtime, touched on every
use) down to the limit; the shards in use at that moment can keep the cache above it.
A download is verified against the manifest's size and sha256 before it enters the cache.
"""
from __future__ import annotations

import fcntl
import os
import re
import uuid
from dataclasses import dataclass

from . import storage
from .manifest import ShardInfo

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_size(text) -> int:
    """'20GB' -> 20 * 10**9 bytes ('20GiB' -> 20 * 2**30; a plain number is bytes)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cache limit {text!r}: expected a size such as 20GB, 500MiB or a "
                         "number of bytes")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


@dataclass
class CachedShard:
    """An open cached shard: `read()` its bytes; `close()` releases it for eviction."""
    file: object
    hit: bool          # True when no download was needed
    data: bytes | None = None  # a download's bytes, kept: no need to read the file back

    def read(self) -> bytes:
        return self.data if self.data is not None else self.file.read()

    def close(self) -> None:
        self.file.close()  # closing the descriptor drops its shared lock


class ShardCache:
    def __init__(self, directory: str, limit_bytes: int):
        if limit_bytes < 1:
            raise ValueError("the cache limit must be positive")
        self.directory, self.limit = os.path.abspath(directory), int(limit_bytes)
        os.makedirs(self.directory, exist_ok=True)

    def path(self, info: ShardInfo) -> str:
        return os.path.join(self.directory, f"{info.sha256}.tar")

    def _open_locked(self, path: str, size: int):
        """The cached file opened with a shared lock, or None if absent or incomplete."""
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            return None
        fcntl.flock(f, fcntl.LOCK_SH)
        if os.fstat(f.fileno()).st_nlink == 0 or os.fstat(f.fileno()).st_size != size:
            f.close()  # evicted between open and lock, or not ours
            return None
        return f

    def open(self, url: str, info: ShardInfo) -> CachedShard:
        """The shard `url` from the cache, downloading (and verifying) it first when this
        node has not yet. Raises storage errors (ChecksumError, StorageError, ...)."""
        path = self.path(info)
        f = self._open_locked(path, info.bytes)
        hit, data = f is not None, None
        if f is None:
            with open(path.removesuffix(".tar") + ".lock", "a+b") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # one download per shard per node
                f = self._open_locked(path, info.bytes)
                hit = f is not None
                if f is None:
                    data = storage.read_verified(url, info.bytes, info.sha256)
                    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
                    with open(tmp, "wb") as out:
                        out.write(data)
                    os.replace(tmp, path)
                    f = self._open_locked(path, info.bytes)
        os.utime(path)  # the LRU clock
        if not hit:
            self.evict(keep=path)
        return CachedShard(f, hit, data)

    def usage(self) -> int:
        return sum(e.stat().st_size for e in os.scandir(self.directory)
                   if e.name.endswith(".tar"))

    def evict(self, keep: str | None = None) -> int:
        """Delete least recently used shards not being read until the cache fits its
        limit; returns the bytes freed."""
        freed = 0
        with open(os.path.join(self.directory, ".evict.lock"), "a+b") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            entries = []
            for e in os.scandir(self.directory):
                if e.name.endswith(".tar"):
                    try:
                        st = e.stat()
                    except FileNotFoundError:
                        continue
                    entries.append((st.st_mtime_ns, e.path, st.st_size))
            total = sum(size for _, _, size in entries)
            for _, path, size in sorted(entries):
                if total <= self.limit:
                    break
                if path == keep or not self._remove_if_unused(path):
                    continue
                total -= size
                freed += size
        return freed

    def _remove_if_unused(self, path: str) -> bool:
        with open(path.removesuffix(".tar") + ".lock", "a+b") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # not being downloaded
            except BlockingIOError:
                return False
            try:
                f = open(path, "rb")
            except FileNotFoundError:
                return False
            with f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody reading it
                except BlockingIOError:
                    return False
                os.unlink(path)
        return True
