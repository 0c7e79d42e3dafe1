"""Opening a loader stream's shards in their reading order, fetching ahead.

Remote shards (s3://, http(s)://, ...) are fetched whole, `prefetch` shards ahead of the
reader in background threads, from the node's `ShardCache` when one is configured (which
downloads each shard once per node) or straight into memory otherwise. Local and memory://
shards are opened as before (the page cache is their prefetch). Fetching changes where
bytes come from, never which samples are read or in which order.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterator

from . import storage
from .cache import ShardCache
from .manifest import ShardInfo
from .reader import ShardError, iter_shard

DEFAULT_PREFETCH = 2


@dataclass(frozen=True)
class FetchOptions:
    """How remote shards are fetched (one record; `make_loader` takes its fields)."""
    prefetch: int = DEFAULT_PREFETCH     # shards fetched ahead per loader worker (0: none)
    cache_dir: str | None = None         # node-local cache directory (None: no cache)
    cache_limit: int | None = None       # bytes; required with cache_dir

    def __post_init__(self):
        if self.prefetch < 0:
            raise ValueError("prefetch must be >= 0")
        if self.cache_dir is not None and not self.cache_limit:
            raise ValueError("a cache directory needs a size limit (e.g. --cache-limit 20GB)")

    def cache(self) -> ShardCache | None:
        return ShardCache(self.cache_dir, self.cache_limit) if self.cache_dir else None


@dataclass
class FetchStats:
    downloads: int = 0     # whole-shard GETs from the store (cache misses included)
    cache_hits: int = 0    # shards served by the node cache without a download


class _Job:
    """One shard's fetch, run in a daemon thread (a finished stream never waits for it)."""

    def __init__(self, fetch, url: str):
        self.url, self._done = url, threading.Event()
        self._value = self._error = None
        threading.Thread(target=self._run, args=(fetch,), daemon=True,
                         name="shard-prefetch").start()

    def _run(self, fetch) -> None:
        try:
            self._value = fetch()
        except BaseException as err:  # handed to the reader, which reports it
            self._error = err
        finally:
            self._done.set()

    def result(self):
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value

    def discard(self) -> None:
        """Release what the fetch holds (a cached shard's read lock) once it is done."""
        def release():
            self._done.wait()
            if hasattr(self._value, "close"):
                self._value.close()
        if self._done.is_set():
            release()
        else:
            threading.Thread(target=release, daemon=True).start()


class ShardFetcher:
    """`open(n)` iterates the members of the n-th of `items` ((url, ShardInfo) in reading
    order); calls must come in order 0, 1, 2, ... Errors surface as ShardError on the
    first `next()`, like `iter_shard`."""

    def __init__(self, items: list[tuple[str, ShardInfo]], verify: bool,
                 options: FetchOptions, cache: ShardCache | None = None):
        self.items, self.verify, self.options = items, verify, options
        self.cache = cache
        self.stats = FetchStats()
        self._jobs: dict[int, _Job] = {}
        self._lock = threading.Lock()

    def _fetch(self, url: str, info: ShardInfo):
        if self.cache is not None:
            shard = self.cache.open(url, info)
            with self._lock:
                if shard.hit:
                    self.stats.cache_hits += 1
                else:
                    self.stats.downloads += 1
            return shard
        data = (storage.read_verified(url, info.bytes, info.sha256) if self.verify
                else storage.read_bytes(url, info.bytes))
        with self._lock:
            self.stats.downloads += 1
        return data

    def _start(self, n: int) -> None:
        if n < len(self.items) and n not in self._jobs and storage.is_remote(self.items[n][0]):
            url, info = self.items[n]
            self._jobs[n] = _Job(lambda: self._fetch(url, info), url)

    def open(self, n: int) -> Iterator[dict[str, bytes]]:
        url, info = self.items[n]
        if not storage.is_remote(url):
            return iter_shard(url, info, self.verify)
        for ahead in range(n, n + 1 + self.options.prefetch):
            self._start(ahead)
        return self._members(n, url, info)

    def _members(self, n: int, url: str, info: ShardInfo) -> Iterator[dict[str, bytes]]:
        job = self._jobs.pop(n)
        try:
            got = job.result()
        except FileNotFoundError:
            raise ShardError(f"shard {storage.redact(url)}: not found") from None
        except storage.ChecksumError as err:
            raise ShardError(str(err)) from None
        except PermissionError:
            raise  # credentials, not data: stop with the one-line message naming the URL
        except OSError as err:  # StorageError (retries exhausted): the message names the URL
            raise ShardError(f"shard {storage.redact(err)}") from None
        if isinstance(got, bytes):
            yield from iter_shard(url, info, verify=False, data=got)
            return
        try:  # a cached shard: read under its lock, so it is not evicted meanwhile
            yield from iter_shard(url, info, verify=False, data=got.read())
        finally:
            got.close()

    def close(self) -> None:
        for job in self._jobs.values():
            job.discard()
        self._jobs.clear()
