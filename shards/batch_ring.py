"""Reusing shared-memory batch buffers between a DataLoader worker and the main process.

A worker hands a batch to the main process through shared memory. Allocating fresh shared
memory for every batch means first-touch page faults on every byte, which on virtualised
hosts cost more than decoding the JPEGs (measured: ~5 ms per 384x384 clip on this project's
VMs, against ~0.7 ms when buffers are reused). So each worker cycles through `size`
buffers, and reuses one only after the main process has copied the batch out of it and
counted it in `released` (a shared int64 per worker).
"""
from __future__ import annotations

import sys
import time
from collections import deque

import numpy as np
import torch

# More than DataLoader keeps in flight per worker (prefetch_factor, default 2), so a
# worker normally finds its next buffer already released and never waits.
DEFAULT_RING_SIZE = 4
WAIT_LIMIT_S = 600.0
STOP = 1 << 62  # released[w] >= STOP: the pass is over, nobody reads the buffers any more


class WorkerRing:
    """Worker side: `slot(c)` gives the buffers (a dict name -> tensor, filled lazily by
    the caller) for this worker's c-th batch of the pass, waiting until it is free."""

    def __init__(self, released: torch.Tensor, worker: int, size: int):
        self.released, self.worker, self.size = released, worker, size
        self.slots: list[dict[str, torch.Tensor]] = [{} for _ in range(size)]

    def slot(self, count: int) -> dict[str, torch.Tensor]:
        needed = count - self.size + 1  # batches of this worker the main process must have released
        start = time.monotonic()
        while int(self.released[self.worker]) < needed:
            if time.monotonic() - start > WAIT_LIMIT_S:
                raise RuntimeError(f"loader worker {self.worker}: the main process released no "
                                   f"batch buffer for {WAIT_LIMIT_S:.0f} s")
            time.sleep(0.0005)
        return self.slots[count % self.size]

    def tensor(self, slot: dict, name: str, shape: tuple) -> torch.Tensor:
        tensor = slot.get(name)
        if tensor is None or tuple(tensor.shape) != tuple(shape):
            tensor = slot[name] = torch.empty(shape, dtype=torch.uint8).share_memory_()
        return tensor


class MainRing:
    """Main-process side for one DataLoader pass: copies each batch out of its worker's
    buffer and releases it. `released` goes to the workers (shared memory)."""

    def __init__(self, workers: int, names: tuple[str, ...] = ("frames", "masks", "soft"),
                 size: int = DEFAULT_RING_SIZE):
        self.released = torch.zeros(workers, dtype=torch.int64).share_memory_()
        self.names, self.size = names, size
        # Holding the workers' buffers keeps torch's mapping of them alive, so receiving the
        # same buffer again maps nothing new (no page faults on the next copy).
        self._mapped: deque = deque(maxlen=size * workers * len(names))

    def take_out(self, batch: dict, worker: int) -> None:
        """Give `batch` private copies of the ring tensors (pinned copies made by
        DataLoader's pin_memory are private already), then release the worker's buffer."""
        for name in self.names:
            tensor = batch.get(name)  # "soft" only in batches with static clips
            if tensor is not None and not tensor.is_pinned():
                self._mapped.append(tensor)
                # numpy-allocated: numpy asks for transparent huge pages, so first-touch
                # faults on the copy cost ~4x less than torch.clone's here
                private = np.empty(tuple(tensor.shape), np.uint8)
                np.copyto(private, tensor.numpy())
                batch[name] = torch.from_numpy(private)
        self.released[worker] += 1

    def stop(self) -> None:
        """The pass is over: no worker may wait for a release any more."""
        self.released.fill_(STOP)
        self._mapped.clear()


class LocalPool:
    """Batch arrays for a loader running in the main process (num_workers=0), reused once
    nothing references them any more (every tensor or view made from an array keeps a
    reference to it, so CPython's reference count says when the caller is done). Saves
    the first-touch page faults of a fresh batch, as the worker ring does."""

    def __init__(self, capacity: int = 8):
        self.capacity = capacity
        self.arrays: list[np.ndarray] = []

    def array(self, shape: tuple) -> np.ndarray:
        for i in range(len(self.arrays)):
            # references: the list, and getrefcount's argument
            if self.arrays[i].shape == shape and sys.getrefcount(self.arrays[i]) == 2:
                return self.arrays[i]
        array = np.empty(shape, np.uint8)
        if len(self.arrays) < self.capacity:
            self.arrays.append(array)
        return array
