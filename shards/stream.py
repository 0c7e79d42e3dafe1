"""Streaming shard sets to DDP ranks and DataLoader workers, with exact resumption.

`make_loader(...)` returns a `ClipLoader`; the plan (who reads what, in which order) is
`shards.plan`. Each DataLoader worker runs one "stream": it reads its segment of the
epoch's global order shard by shard (each shard opened through fsspec, checksum checked
on open unless verify=False), holds at most `shuffle_buffer` raw samples, decodes
JPEG/masks straight into the batch arrays and yields whole batches. The main process
counts the batches it hands out, which is all it needs to resume exactly.

Bad data never stops the batch count: a sample that cannot be read or decoded (truncated
tar, corrupt JPEG, missing member, checksum mismatch) is reported with a warning naming the
shard and key and its batch slot is filled with a duplicate of a good sample, so every rank
still yields the planned batches and DDP cannot hang. Past `max_bad_fraction` of a stream's
planned samples the loader stops with `BadDataError`.
"""
from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import signal
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import batch_ring, plan, seeds, storage
from .codec import SampleDecodeError, decode_sample
from .fetch import DEFAULT_PREFETCH, FetchOptions, ShardFetcher
from .manifest import ShardInfo, read_manifest
from .reader import ShardError

STATE_VERSION = 1
DEFAULT_SHUFFLE_BUFFER = 256
DEFAULT_MAX_BAD_FRACTION = 0.05


#: Left to the main process: a scheduler signals the whole process group, and a worker
#: that died of it would take the run down before the main process could checkpoint.
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, n))


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: ignore STOP_SIGNALS (they were blocked since the fork)."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _kill_daemonic_children() -> None:
    """At interpreter exit multiprocessing ends daemonic children (loader workers) with
    SIGTERM, which our workers ignore: a loader still referenced at exit would make the exit
    wait for them forever. End them with SIGKILL first (registered after multiprocessing's
    own exit hook, so it runs before it)."""
    children = [child for child in multiprocessing.active_children() if child.daemon]
    if not children:
        return
    if hasattr(signal, "SIGCHLD"):  # torch's SIGCHLD handler would raise for each killed worker
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()
    for child in children:
        child.join(timeout=5)


atexit.register(_kill_daemonic_children)


@contextlib.contextmanager
def _stop_signals_blocked():
    """Block STOP_SIGNALS while the workers are forked, so that none of them can die of one
    before it ignores them; a signal arriving meanwhile reaches the main process after."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _decodes(members: dict[str, bytes] | None) -> bool:
    """Whether a sample read from a shard (None: unreadable) decodes."""
    if members is None:
        return False
    try:
        decode_sample(members)
    except SampleDecodeError:
        return False
    return True


class BadDataError(RuntimeError):
    """More bad samples than the loader's max_bad_fraction allows."""


class BadDataWarning(UserWarning):
    """One bad sample or shard was skipped (its batch slot holds a duplicate)."""


@dataclass(frozen=True)
class ShardSource:
    """One shard set in a mix. weight 5 visits every shard five times per epoch;
    fractional weights visit a seeded random subset of the shards for the fraction.
    [start, stop) restricts the set to those samples, counted in manifest order (shards in
    order, samples in shard order; stop None: to the end): phases that share a set read
    disjoint ranges of it. A shard cut by a bound is read from its start and the samples
    before the range skipped (tar shards stream)."""
    url: str
    weight: float = 1.0
    start: int = 0
    stop: int | None = None

    def __post_init__(self):
        if self.start < 0 or (self.stop is not None and self.stop < self.start):
            raise ValueError(f"{self.url}: bad sample range [{self.start}, {self.stop})")


@dataclass
class LoaderStats:
    samples_read: int = 0   # samples decoded into batches
    bad_samples: int = 0    # samples skipped (unreadable or undecodable)
    bad_shards: int = 0     # shard visits that failed (checksum, truncation, missing)
    substituted: int = 0    # batch slots filled with a duplicate of a good sample
    retries: int = 0        # storage requests retried (transient errors, see shards.storage)
    downloads: int = 0      # remote shards fetched whole from the store
    cache_hits: int = 0     # remote shards served by the node-local cache

    def __add__(self, other: "LoaderStats") -> "LoaderStats":
        return LoaderStats(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values())))


@dataclass(frozen=True)
class _Source:
    url: str
    weight: float
    shards: tuple[ShardInfo, ...]   # the shards the range touches
    first: tuple[int, ...]          # per shard: sample ordinal where the range starts in it
    counts: tuple[int, ...]         # per shard: samples of the range in it
    range: tuple[int, int]          # [start, stop) in the set's manifest order

    @classmethod
    def of(cls, source: ShardSource, shards: Sequence[ShardInfo]) -> "_Source":
        total = sum(s.count for s in shards)
        stop = total if source.stop is None else source.stop
        if stop > total:
            raise ValueError(f"{source.url}: sample range [{source.start}, {stop}) goes past "
                             f"its {total} samples; make the set bigger or read less of it")
        kept, first, counts, offset = [], [], [], 0
        for info in shards:
            lo, hi = max(source.start, offset), min(stop, offset + info.count)
            if lo < hi:
                kept.append(info)
                first.append(lo - offset)
                counts.append(hi - lo)
            offset += info.count
        return cls(source.url.rstrip("/"), float(source.weight), tuple(kept), tuple(first),
                   tuple(counts), (source.start, stop))


def _as_sources(sources) -> list[ShardSource]:
    if isinstance(sources, (str, ShardSource)):
        sources = [sources]
    out = []
    for s in sources:
        if isinstance(s, ShardSource):
            out.append(s)
        elif isinstance(s, str):
            out.append(ShardSource(s))
        else:
            url, weight = s
            out.append(ShardSource(str(url), float(weight)))
    if not out:
        raise ValueError("make_loader needs at least one shard set")
    return out


class ClipStream(IterableDataset):
    """IterableDataset yielding whole batches of one rank's share of an epoch.

    Configured for one pass by `ClipLoader` (epoch, legs, remaining positions); each
    DataLoader worker serves one stream of the current leg."""

    def __init__(self, sources: list[_Source], batch_size: int, rank: int, seed: int,
                 verify: bool, max_bad_fraction: float, fetch: FetchOptions = FetchOptions()):
        self.sources, self.batch_size, self.rank, self.seed = sources, batch_size, rank, seed
        self.verify, self.max_bad_fraction, self.fetch = verify, max_bad_fraction, fetch
        self.epoch, self.legs, self.remaining = 0, [], None
        self.released: torch.Tensor | None = None  # batch_ring counters, set per pass
        self.ring_size = 0

    @property
    def shard_counts(self) -> list[list[int]]:
        return [list(src.counts) for src in self.sources]

    def epoch_layout(self, epoch: int):
        visits = plan.epoch_visits(self.shard_counts, [s.weight for s in self.sources],
                                   self.seed, epoch)
        visit_of, ordinal = plan.epoch_positions(visits, self.shard_counts)
        return visits, visit_of, ordinal

    def configure(self, epoch: int, legs: list[plan.Leg], remaining: np.ndarray | None,
                  ring: batch_ring.MainRing | None = None):
        self.epoch, self.legs, self.remaining = epoch, list(legs), remaining
        self.released = ring.released if ring is not None else None
        self.ring_size = ring.size if ring is not None else 0

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        wid, nw = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        leg = self.legs[-1]
        if leg.workers != nw:
            raise RuntimeError(f"leg planned for {leg.workers} workers, DataLoader has {nw}")
        visits, visit_of, ordinal = self.epoch_layout(self.epoch)
        remaining = np.arange(len(visit_of)) if self.remaining is None else self.remaining
        # DataLoader restarts its round robin at worker 0; after N batches the next batch
        # belongs to stream N % workers, so worker w serves stream (w + N) % workers.
        k = (wid + leg.batches) % nw
        segment = plan.stream_segment(remaining, leg, self.rank, k)
        order = plan.stream_order(self.seed, self.epoch, len(self.legs) - 1, self.rank, k,
                                  len(segment), leg.buffer)
        ring = None
        if worker is not None and self.released is not None:
            ring = batch_ring.WorkerRing(self.released, wid, self.ring_size)
        yield from _StreamRun(self, visits, visit_of[segment], ordinal[segment], order, k,
                              plan.consumed_batches(leg.batches, nw, k), ring, wid).batches()


class _StreamRun:
    """One stream's pass: reading in segment order, emitting in shuffled order."""

    def __init__(self, ds: ClipStream, visits, visit_of, ordinal, order, k: int, skip: int,
                 ring: batch_ring.WorkerRing | None, worker: int):
        self.ds, self.visits, self.visit_of, self.ordinal = ds, visits, visit_of, ordinal
        self.order, self.k, self.skip, self.ring, self.worker = order, k, skip, ring, worker
        self.pool = batch_ring.LocalPool() if ring is None else None
        self.stats = LoaderStats()
        self.fetcher: ShardFetcher | None = None
        self._retries_before = storage.retry_count()
        self.last_good: dict[str, bytes] | None = None  # raw members: substitutes cost nothing
                                                        # until a bad sample needs one

    def _shard_url(self, visit: int) -> tuple[str, ShardInfo, int]:
        """URL, record and first sample ordinal (the range's start in it) of a visit."""
        src, shard = self.visits[visit]
        source = self.ds.sources[src]
        info = source.shards[shard]
        return storage.join(source.url, info.name), info, source.first[shard]

    def _read(self, inputs: np.ndarray) -> Iterator[tuple[int, dict | None, str]]:
        """(input index, members or None, where) for `inputs` in ascending order."""
        # the shard visits in reading order are known up front: the fetcher works ahead
        visits = self.visit_of[inputs]
        firsts = np.flatnonzero(np.r_[True, visits[1:] != visits[:-1]]) if len(visits) else []
        self.fetcher = ShardFetcher([self._shard_url(int(v))[:2] for v in visits[firsts]],
                                    self.ds.verify, self.ds.fetch, self.ds.fetch.cache())
        opened = 0
        current, tar, next_ordinal, broken = None, None, 0, False
        for i in inputs:
            visit = int(self.visit_of[i])
            url, info, first = self._shard_url(visit)
            want = int(self.ordinal[i]) + first
            if visit != current:
                if tar is not None:
                    tar.close()
                current, next_ordinal, broken = visit, 0, False
                tar = self.fetcher.open(opened)
                opened += 1
            if not broken:
                try:
                    members = None
                    while next_ordinal <= want:
                        members = next(tar)
                        next_ordinal += 1
                    yield i, members, f"shard {url} key {members['__key__']}"
                    continue
                except StopIteration:
                    broken = True
                    self._shard_failed(f"shard {url}: holds fewer samples than the manifest's "
                                       f"{info.count}")
                except ShardError as err:
                    broken = True
                    self._shard_failed(str(err))
            yield i, None, f"shard {url} sample #{want}"
        if tar is not None:
            tar.close()
        self.fetcher.close()  # (an abandoned stream's shards are released when collected)

    def _shard_failed(self, message: str) -> None:
        self.stats.bad_shards += 1
        warnings.warn(f"{message}; skipping its remaining samples", BadDataWarning, stacklevel=2)

    def _bad_sample(self, where: str, why: str, planned: int, warn: bool = True) -> None:
        self.stats.bad_samples += 1
        if warn:
            warnings.warn(f"bad sample skipped: {where}: {why}", BadDataWarning, stacklevel=2)
        limit = self.ds.max_bad_fraction * planned
        if self.stats.bad_samples > limit:
            raise BadDataError(
                f"{self.stats.bad_samples} bad samples among the {planned} planned for loader "
                f"stream {self.k} of rank {self.ds.rank} (max_bad_fraction="
                f"{self.ds.max_bad_fraction}); last: {where}: {why}. Check the shard set with "
                "tools/verify_shards URL, or raise max_bad_fraction.")

    def batches(self) -> Iterator[dict]:
        b = self.ds.batch_size
        n_batches, planned = len(self.order) // b, len(self.order)
        reader = self._read(np.sort(self.order[self.skip * b:]))
        held: dict[int, tuple[dict | None, str]] = {}  # the shuffle buffer: raw samples
        for j in range(self.skip, n_batches):
            frames = masks = None  # numpy views of the batch tensors, made on first decode
            tensors: dict[str, torch.Tensor] = {}
            soft = _SoftMasks(self, tensors, b)
            buffers = self.ring.slot(j - self.skip) if self.ring is not None else None
            metas, keys, bad_slots = [None] * b, [None] * b, []
            for slot, i in enumerate(self.order[j * b:(j + 1) * b]):
                while i not in held:
                    got, members, where = next(reader)
                    held[got] = (members, where)
                members, where = held.pop(i)
                if members is None:  # its shard failed; that warning named it already
                    self._bad_sample(where, "its shard is unreadable", planned, warn=False)
                    bad_slots.append(slot)
                    continue
                try:
                    if frames is None:
                        sample = decode_sample(members)
                        frames = self._batch_array(tensors, buffers, "frames",
                                                   sample["frames"].shape)
                        masks = self._batch_array(tensors, buffers, "masks",
                                                  sample["masks"].shape)
                        frames[slot], masks[slot] = sample["frames"], sample["masks"]
                    else:
                        sample = decode_sample(members, frames[slot], masks[slot],
                                               soft.out(slot))
                except SampleDecodeError as err:
                    self._bad_sample(where, str(err), planned)
                    bad_slots.append(slot)
                    continue
                soft.took(slot, sample, buffers)
                metas[slot], keys[slot] = sample["meta"], sample["__key__"]
                self.last_good = members
                self.stats.samples_read += 1
            if bad_slots and self.last_good is None:
                self._look_ahead_for_a_good_sample(reader, held)
            self._fill_bad_slots(bad_slots, tensors, buffers, frames, masks, metas, keys, soft)
            self._count_fetches()
            yield {"frames": tensors["frames"], "masks": tensors["masks"], **soft.batch(),
                   "meta": metas, "__key__": keys,
                   "_stream": self.k, "_stream_batch": j, "_stats": asdict(self.stats),
                   "_worker": self.worker}

    def _count_fetches(self) -> None:
        self.stats.retries = storage.retry_count() - self._retries_before
        if self.fetcher is not None:
            self.stats.downloads = self.fetcher.stats.downloads
            self.stats.cache_hits = self.fetcher.stats.cache_hits

    def _batch_array(self, tensors: dict, buffers: dict | None, name: str, shape: tuple
                     ) -> np.ndarray:
        """A uint8 batch array to decode into: a reused shared-memory buffer of the
        worker's ring in a DataLoader worker, a pooled array in the main process (see
        batch_ring; fresh memory costs first-touch page faults on every batch)."""
        full = (self.ds.batch_size,) + tuple(shape)
        if buffers is not None:
            tensor = self.ring.tensor(buffers, name, full)
        else:
            tensor = torch.from_numpy(self.pool.array(full))
        tensors[name] = tensor
        return tensor.numpy()

    def _look_ahead_for_a_good_sample(self, reader, held) -> None:
        """No good sample yet to duplicate (e.g. the stream starts with a broken shard):
        take one from the shuffle buffer if it holds one that decodes, else read on until
        one decodes. What is read stays held and is emitted in its turn."""
        for members, _ in held.values():
            if _decodes(members):
                self.last_good = members
                return
        for got, members, where in reader:
            held[got] = (members, where)
            if _decodes(members):
                self.last_good = members
                return

    def _fill_bad_slots(self, bad_slots, tensors, buffers, frames, masks, metas, keys,
                        soft: "_SoftMasks") -> None:
        """Decode a duplicate of the stream's latest good sample into every bad slot
        (allocating the batch arrays if no sample of this batch was good)."""
        if not bad_slots:
            return
        if self.last_good is None:
            raise BadDataError(f"loader stream {self.k} of rank {self.ds.rank}: not one of its "
                               "samples is readable; check the shard set with "
                               "tools/verify_shards URL")
        for slot in bad_slots:
            if frames is None:
                sample = decode_sample(self.last_good)
                frames = self._batch_array(tensors, buffers, "frames", sample["frames"].shape)
                masks = self._batch_array(tensors, buffers, "masks", sample["masks"].shape)
            sample = decode_sample(self.last_good, frames[slot], masks[slot], soft.out(slot))
            soft.took(slot, sample, buffers)
            metas[slot], keys[slot] = sample["meta"], sample["__key__"]
            self.stats.substituted += 1


class _SoftMasks:
    """The soft masks of one batch (static clips, see shards.codec): the batch gets "soft"
    (uint8 (B, T, H, W), zero for a clip without) and "has_soft" (bool (B,)) only when one
    of its clips has them, so video batches cost nothing more."""

    def __init__(self, run: _StreamRun, tensors: dict, batch_size: int):
        self.run, self.tensors, self.array = run, tensors, None
        self.present = [False] * batch_size

    def out(self, slot: int) -> np.ndarray | None:
        return None if self.array is None else self.array[slot]

    def took(self, slot: int, sample: dict, buffers) -> None:
        if sample["soft"] is None:
            return
        self.present[slot] = True
        if self.array is None:  # the batch's first soft masks: the earlier slots have none
            self.array = self.run._batch_array(self.tensors, buffers, "soft",
                                               sample["soft"].shape)
            self.array[...] = 0
            self.array[slot] = sample["soft"]

    def batch(self) -> dict:
        if self.array is None:
            return {}
        return {"soft": self.tensors["soft"], "has_soft": torch.tensor(self.present)}


class ClipLoader:
    """A rank's view of the training stream: `for batch in loader` yields the rest of the
    current epoch (len(loader) batches, equal on every rank), then moves to the next epoch.

    The state is (epoch, legs): see shards.plan. `state_dict()` after N batches and
    `load_state_dict()` into a loader with the same world size, workers, batch size and
    buffer gives exactly batches N, N+1, ... of the uninterrupted run; with different ones
    the rest of the epoch is re-planned over the samples not yet delivered."""

    def __init__(self, dataset: ClipStream, world_size: int, num_workers: int,
                 buffer: int, pin_memory: bool = False, prefetch_factor: int | None = None):
        self.dataset, self.world_size, self.num_workers = dataset, world_size, num_workers
        self.buffer, self.pin_memory, self.prefetch_factor = buffer, pin_memory, prefetch_factor
        self.epoch = 0
        self.legs = [self._fresh_leg()]
        self.finished_stats = LoaderStats()   # from completed passes
        self._pass_stats: dict[int, LoaderStats] = {}  # latest per stream, current pass
        self._remaining_cache: tuple | None = None

    def _fresh_leg(self) -> plan.Leg:
        return plan.Leg(world=self.world_size, workers=max(1, self.num_workers),
                        batch=self.dataset.batch_size, buffer=self.buffer)

    @property
    def stats(self) -> LoaderStats:
        total = self.finished_stats
        for s in self._pass_stats.values():
            total = total + s
        return total

    def _total_positions(self, epoch: int) -> int:
        return len(self.dataset.epoch_layout(epoch)[1])

    def _remaining(self) -> np.ndarray | None:
        """Positions the current leg plans over (None: the whole epoch)."""
        if len(self.legs) == 1:
            return None
        key = (self.epoch, tuple(self.legs[:-1]))
        if self._remaining_cache is None or self._remaining_cache[0] != key:
            remaining = plan.remaining_positions(self._total_positions(self.epoch), self.legs,
                                                 self.dataset.seed, self.epoch)
            self._remaining_cache = (key, remaining)
        return self._remaining_cache[1]

    def _leg_batches(self) -> int:
        remaining = self._remaining()
        n = self._total_positions(self.epoch) if remaining is None else len(remaining)
        return plan.batches_per_rank(n, self.legs[-1])

    def __len__(self) -> int:
        """Batches the next `for batch in loader` yields (the rest of the current epoch)."""
        return max(0, self._leg_batches() - self.legs[-1].batches)

    def _next_epoch(self) -> None:
        self.epoch += 1
        self.legs = [self._fresh_leg()]

    def __iter__(self) -> Iterator[dict]:
        planned = self._leg_batches()
        if planned == 0 and len(self.legs) == 1:
            raise ValueError(
                f"epoch {self.epoch} has {self._total_positions(self.epoch)} samples, fewer "
                f"than one batch per rank (world size {self.world_size} x batch size "
                f"{self.dataset.batch_size}); add data or lower the batch size")
        leg = self.legs[-1]
        if leg.batches < planned:
            ring = None
            if self.num_workers > 0:
                # more buffers than DataLoader keeps in flight per worker: no waiting
                ring = batch_ring.MainRing(self.num_workers, size=(self.prefetch_factor or 2) + 2)
            self.dataset.configure(self.epoch, self.legs, self._remaining(), ring)
            # Each DataLoader iterator draws its workers' base seed from `generator`; left
            # unset it would draw from the global torch generator, which a trainer's
            # checkpoint holds: a resumed run's fresh iterator would draw once more than
            # the uninterrupted run did, and the global stream would be one draw ahead.
            generator = torch.Generator().manual_seed(seeds.derived_seed(
                self.dataset.seed, "dataloader", epoch=self.epoch, rank=self.dataset.rank))
            loader = DataLoader(self.dataset, batch_size=None, collate_fn=_as_is,
                                num_workers=self.num_workers,
                                pin_memory=self.pin_memory, prefetch_factor=self.prefetch_factor,
                                persistent_workers=False, generator=generator,
                                worker_init_fn=_ignore_stop_signals if self.num_workers else None)
            self._pass_stats = {}
            try:
                with _stop_signals_blocked():
                    batches = iter(loader)  # forks the workers
                for batch in batches:
                    worker = batch.pop("_worker")
                    if ring is not None:
                        ring.take_out(batch, worker)
                    self._account(batch)
                    yield batch
            finally:
                if ring is not None:
                    ring.stop()
                self.finished_stats = self.stats
                self._pass_stats = {}
            if self.legs[-1].batches != planned:
                raise RuntimeError(f"loader delivered {self.legs[-1].batches} of {planned} "
                                   "planned batches in this epoch")
        self._next_epoch()

    def _account(self, batch: dict) -> None:
        leg = self.legs[-1]
        stream, stream_batch = batch.pop("_stream"), batch.pop("_stream_batch")
        self._pass_stats[stream] = LoaderStats(**batch.pop("_stats"))
        expected = leg.batches % leg.workers, leg.batches // leg.workers
        if (stream, stream_batch) != expected:
            raise RuntimeError(f"DataLoader delivered batch {stream_batch} of stream {stream}, "
                               f"the plan expects batch {expected[1]} of stream {expected[0]}")
        self.legs[-1] = replace(leg, batches=leg.batches + 1)

    def state_dict(self) -> dict:
        """Where this rank is: epoch, legs (shards.plan), and what the plan was made from.
        Identical on every rank except `stats` (this rank's counts)."""
        return {"version": STATE_VERSION, "seed": self.dataset.seed, "epoch": self.epoch,
                "legs": [asdict(leg) for leg in self.legs],
                "sources": [{"url": s.url, "weight": s.weight, "counts": list(s.counts),
                             "range": list(s.range)} for s in self.dataset.sources],
                "stats": asdict(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (saved by any rank, at any world size / worker count)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')}, "
                             f"expected {STATE_VERSION}")
        mine = self.state_dict()
        # The plan depends on the seed, the weights and the shard counts, not on where the
        # sets live: moving them (another bucket, a local copy) keeps the resume exact.
        def plan_inputs(st):  # a state saved before ranges existed read whole sets
            return st["seed"], [(s["weight"], list(s["counts"]),
                                 tuple(s.get("range") or (0, sum(s["counts"]))))
                                for s in st["sources"]]

        def describe(st):
            sets = ", ".join(f"{s['url']} x{s['weight']:g} ({sum(s['counts'])} clips"
                             + (f" [{s['range'][0]}, {s['range'][1]})" if s.get("range") else "")
                             + ")" for s in st["sources"])
            return f"seed {st['seed']}, {sets}"

        if plan_inputs(state) != plan_inputs(mine):
            raise ValueError(
                "loader state was saved for a different seed, weights or shard sets "
                f"(saved: {describe(state)}; now: {describe(mine)}); resuming would not "
                "continue the same epoch plan")
        self.epoch = int(state["epoch"])
        self.legs = [plan.Leg(**leg) for leg in state["legs"]]
        self.finished_stats = LoaderStats(**state["stats"])
        self._pass_stats = {}
        fresh = self._fresh_leg()
        if not self.legs[-1].same_layout(fresh):
            # elastic resume: a new leg re-plans the positions nobody delivered yet (a leg
            # that delivered nothing is simply replaced)
            if self.legs[-1].batches == 0:
                self.legs.pop()
            self.legs.append(fresh)


def _as_is(batch: dict) -> dict:
    """ClipStream yields finished batches; DataLoader's default would walk every meta dict."""
    return batch


def _default_rank_world(rank, world_size) -> tuple[int, int]:
    dist = torch.distributed
    if rank is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    return rank, world_size


def make_loader(sources: str | ShardSource | Sequence, batch_size: int,
                rank: int | None = None, world_size: int | None = None, num_workers: int = 0,
                seed: int = 0, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                verify: bool = True, max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
                pin_memory: bool = False, prefetch_factor: int | None = None,
                prefetch: int = DEFAULT_PREFETCH, cache_dir: str | None = None,
                cache_limit: int | str | None = None) -> ClipLoader:
    """The streaming loader of one rank over one or several weighted shard sets.

    sources: URL, ShardSource, or a list of them / of (url, weight) pairs; a ShardSource
        may restrict its set to a sample range (start, stop).
    rank / world_size: default to torch.distributed's when initialised, else 0 / 1.
    shuffle_buffer: samples held (raw bytes) per worker for shuffling.
    verify: check each shard's size and sha256 against the manifest when it is opened
        (reads the shard whole into memory first); False streams it.
    max_bad_fraction: stop with BadDataError when more than this fraction of a worker's
        planned samples were bad.
    prefetch: remote shards each worker fetches ahead, in background threads.
    cache_dir / cache_limit: a node-local cache of remote shards (bytes, or "20GB"),
        shared by every rank and worker of the node (see shards.cache).
    Neither changes which samples are read or their order.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    rank, world_size = _default_rank_world(rank, world_size)
    resolved = []
    for s in _as_sources(sources):
        manifest = read_manifest(s.url)
        resolved.append(_Source.of(s, manifest.shards))
    from .cache import parse_size
    fetch = FetchOptions(prefetch, cache_dir,
                         parse_size(cache_limit) if cache_limit is not None else None)
    dataset = ClipStream(resolved, batch_size, rank, seed, verify, max_bad_fraction, fetch)
    return ClipLoader(dataset, world_size, num_workers, shuffle_buffer, pin_memory,
                      prefetch_factor if num_workers > 0 else None)
