"""The worker processes of one task, and the clip counter behind its progress bar.

`Workers(plan, n)` forks n processes that each hold the plan (or, with n == 1, runs
everything in this process); `submit(fn, *args)` runs `fn(plan, *args, count)` there, where
`count(k)` adds k made clips to the shared counter that `progress` turns into a bar.
"""
from __future__ import annotations

import ctypes
import multiprocessing
from contextlib import contextmanager

import cv2

from shards import console

_PLAN = None
_COUNTER = None
#: glibc's mallopt parameters M_TRIM_THRESHOLD and M_MMAP_THRESHOLD
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def configure_worker() -> None:
    """How a process that makes clips runs: one OpenCV thread (one process per core;
    OpenCV's threads would oversubscribe), and glibc's malloc keeping the memory a clip
    frees for the next one. A 480p clip allocates and frees ~6 MB of frames; by default
    glibc maps each large block afresh and hands freed memory back, so every clip page-
    faulted it in again: ~260 page faults and ~0.6 ms of system time per clip, ~60 and
    ~0.2 ms with these settings (measured; 3-4% of a clip). Elsewhere than glibc: only the
    thread setting."""
    cv2.setNumThreads(1)
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest: blocks up to 32 MB from the heap
    mallopt(_M_TRIM_THRESHOLD, 64 << 20)  # keep up to 64 MB of freed memory at the heap top


def _init_worker(plan, counter) -> None:
    global _PLAN, _COUNTER
    configure_worker()
    _PLAN, _COUNTER = plan, counter


def _count(n: int) -> None:
    with _COUNTER.get_lock():
        _COUNTER.value += n


def _call(fn, args):
    return fn(_PLAN, *args, _count)


class _Ready:
    """A result computed in this process, shaped like a pool's AsyncResult."""

    def __init__(self, value):
        self.value = value

    def ready(self) -> bool:
        return True

    def get(self):
        return self.value


class Workers:
    def __init__(self, plan, workers: int):
        ctx = multiprocessing.get_context("fork")
        self.size = workers
        self.counter = ctx.Value("q", 0)
        self.pool = ctx.Pool(workers, _init_worker, (plan, self.counter)) if workers > 1 else None
        if self.pool is None:
            _init_worker(plan, self.counter)

    def submit(self, fn, *args):
        """fn(plan, *args, count) in a worker: an AsyncResult (ready() / get(), which
        re-raises a worker's error). Without a pool it runs now, here."""
        if self.pool is None:
            return _Ready(_call(fn, args))
        return self.pool.apply_async(_call, (fn, args))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def progress(self, total, desc: str, enabled: bool):
        """A clip bar; its `drain()` adds the clips counted since the last call."""
        with console.progress(total=total, unit="clip", desc=desc, enabled=enabled) as bar:
            yield _Drain(bar, self.counter)


class _Drain:
    def __init__(self, bar, counter):
        self.bar, self.counter, self.last = bar, counter, counter.value

    def drain(self) -> None:
        value = self.counter.value
        self.bar.update(value - self.last)
        self.last = value
