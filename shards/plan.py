"""The epoch plan: which sample every rank, worker and batch gets, as pure functions of the
manifests' shard counts, the mixing weights, the seed and the epoch (no data is read).

Design (exact and elastic resumption):

1. Visits. Each shard of a source with weight w is visited floor(w) times per epoch, plus
   one visit of a seeded random subset of round(frac(w) * shards) shards. All visits of all
   sources are shuffled together (seed, epoch).
2. Global order. The epoch's positions are the visits' samples concatenated in visit order,
   each shard read front to back (tar shards stream; no random access needed).
3. Legs. A leg is a stretch of the epoch run with fixed (world size, workers per rank,
   batch size, shuffle buffer size). It takes the still-unconsumed positions in global
   order, gives each rank an equal contiguous share of whole batches (a tail of fewer than
   world*batch positions is left out of the epoch, like DistributedSampler with
   drop_last), and splits a rank's
   share into one contiguous segment per worker ("stream") with round-robin batch counts,
   which is the order torch's DataLoader takes batches from its workers.
4. Shuffling. Each stream reads its segment in order through a shuffle buffer simulated on
   indices with its own generator (seed, epoch, leg, rank, stream), so its output order is
   known without reading data.
5. Resumption. After N batches of a leg, stream k of every rank has delivered its first
   consumed_batches(N, workers, k) batches. Resuming with the same leg parameters continues
   the same leg (identical batches from N on). Resuming with other parameters starts a new
   leg on the positions no stream has delivered yet: nothing repeats, nothing is skipped.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .seeds import rng


@dataclass(frozen=True)
class Leg:
    world: int      # ranks
    workers: int    # streams per rank (DataLoader workers, at least 1)
    batch: int      # samples per batch
    buffer: int     # shuffle buffer size (samples)
    batches: int = 0  # batches every rank has consumed in this leg

    def same_layout(self, other: "Leg") -> bool:
        return (self.world, self.workers, self.batch, self.buffer) == \
            (other.world, other.workers, other.batch, other.buffer)


def epoch_visits(shard_counts: list[list[int]], weights: list[float], seed: int, epoch: int
                 ) -> np.ndarray:
    """(V, 2) int array of (source, shard) visits in this epoch's shuffled order."""
    visits = []
    for src, (counts, weight) in enumerate(zip(shard_counts, weights)):
        if weight < 0:
            raise ValueError(f"source {src}: weight {weight} must not be negative")
        n = len(counts)
        whole, frac = int(weight), weight - int(weight)
        chosen = np.tile(np.arange(n), whole)
        extra = int(round(frac * n))
        if extra:
            subset = rng(seed, "fractional_visits", epoch=epoch, source=src).choice(n, extra, replace=False)
            chosen = np.concatenate([chosen, np.sort(subset)])
        visits.append(np.stack([np.full(len(chosen), src), chosen], axis=1))
    visits = np.concatenate(visits) if visits else np.zeros((0, 2), np.int64)
    return visits[rng(seed, "visit_order", epoch=epoch).permutation(len(visits))].astype(np.int64)


def epoch_positions(visits: np.ndarray, shard_counts: list[list[int]]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(visit index, sample ordinal in the shard) of every position of the epoch."""
    counts = np.array([shard_counts[s][h] for s, h in visits], dtype=np.int64)
    visit_of = np.repeat(np.arange(len(visits)), counts)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    ordinal = np.arange(len(visit_of)) - starts
    return visit_of, ordinal


def batches_per_rank(remaining: int, leg: Leg) -> int:
    return remaining // (leg.world * leg.batch)


def stream_batches(rank_batches: int, workers: int, k: int) -> int:
    """Batches of stream k when a rank's batches go round-robin over `workers` streams."""
    return rank_batches // workers + (1 if k < rank_batches % workers else 0)


def consumed_batches(batches: int, workers: int, k: int) -> int:
    """How many of stream k's batches are among the rank's first `batches` batches."""
    return stream_batches(batches, workers, k)


def stream_segment(remaining: np.ndarray, leg: Leg, rank: int, k: int) -> np.ndarray:
    """The positions (in global order) that stream k of `rank` reads in this leg."""
    rank_batches = batches_per_rank(len(remaining), leg)
    per_rank = rank_batches * leg.batch
    start = rank * per_rank
    for j in range(k):
        start += stream_batches(rank_batches, leg.workers, j) * leg.batch
    return remaining[start:start + stream_batches(rank_batches, leg.workers, k) * leg.batch]


def buffer_order(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Output order of a shuffle buffer of `size` fed with inputs 0..n-1 in order.

    Once the buffer is full, each new input replaces a uniformly chosen buffered item,
    which is emitted; the rest drains in random order. Item i leaves no earlier than
    input i arrives, and at most `size` inputs are held at any time."""
    if size <= 1 or n <= 1:
        return np.arange(n)
    draws = rng.random(n)
    out = np.empty(n, np.int64)
    buf: list[int] = []
    t = 0
    for i in range(n):
        buf.append(i)
        if len(buf) >= size:
            j = int(draws[t] * len(buf))
            out[t] = buf[j]
            buf[j] = buf[-1]
            buf.pop()
            t += 1
    tail = np.array(buf, np.int64)
    out[t:] = tail[rng.permutation(len(tail))]
    return out


def stream_order(seed: int, epoch: int, leg_index: int, rank: int, k: int, n: int,
                 buffer: int) -> np.ndarray:
    return buffer_order(n, buffer, rng(seed, "shuffle_buffer", epoch=epoch, leg=leg_index,
                                        rank=rank, worker=k))


def remaining_after(remaining: np.ndarray, leg: Leg, leg_index: int, seed: int, epoch: int
                    ) -> np.ndarray:
    """Positions of `remaining` that no stream of any rank delivered in this leg."""
    delivered = np.zeros(len(remaining), bool)
    for rank in range(leg.world):
        for k in range(leg.workers):
            done = consumed_batches(leg.batches, leg.workers, k) * leg.batch
            if not done:
                continue
            segment = stream_segment(remaining, leg, rank, k)
            order = stream_order(seed, epoch, leg_index, rank, k, len(segment), leg.buffer)
            # positions stay in ascending global order, so searchsorted finds them
            delivered[np.searchsorted(remaining, segment[order[:done]])] = True
    return remaining[~delivered]


def remaining_positions(total: int, legs: list[Leg], seed: int, epoch: int) -> np.ndarray:
    """The positions the LAST leg of `legs` plans over: all positions of the epoch minus
    what every earlier leg delivered."""
    remaining = np.arange(total, dtype=np.int64)
    for i, leg in enumerate(legs[:-1]):
        remaining = remaining_after(remaining, leg, i, seed, epoch)
    return remaining
