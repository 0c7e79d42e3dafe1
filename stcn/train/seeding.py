"""The trainer's random streams, keyed through `shards.seeds` (numpy SeedSequence).

- Each rank's streams (object selection, online augmentation, and the global python /
  numpy / torch generators behind weight init and dropout) are keyed by (seed, stage, rank).
- An elastic resume (another world size) cannot restore the saved per-rank states, so it
  starts streams keyed also by the iteration and world size it resumed at: new streams,
  distinct from every stream of the run before it and from each other.
- A skip phase's loader gets a seed keyed by (seed, stage, phase); the loader keys its own
  streams further (epoch, leg, rank, worker; `shards.plan`).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from shards.seeds import derived_seed, rng


@dataclass
class RankStreams:
    global_seed: int                 # python random, numpy's and torch's global generators
    sample_rng: np.random.Generator  # which objects of a clip are the targets
    augment_rng: torch.Generator     # online augmentation of batches


def rank_streams(seed: int, stage: int, rank: int, resumed_at: int | None = None,
                 world_size: int | None = None) -> RankStreams:
    """This rank's streams for a fresh run, or for an elastic resume at iteration
    `resumed_at` with `world_size` ranks."""
    key: dict[str, int] = {"stage": stage, "rank": rank}
    if resumed_at is not None:
        key.update(resumed_at=resumed_at, world_size=int(world_size or 0))
    return RankStreams(global_seed=derived_seed(seed, "globals", **key),
                       sample_rng=rng(seed, "object_selection", **key),
                       augment_rng=torch.Generator().manual_seed(derived_seed(seed, "online_augment", **key)))


def seed_globals(seed: int) -> None:
    """Seed python's, numpy's (legacy, 32-bit) and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def loader_seed(seed: int, stage: int, phase: int) -> int:
    """The shard loader's seed for one skip phase of a stage."""
    return derived_seed(seed, "loader", stage=stage, phase=phase)


__all__ = ["RankStreams", "rank_streams", "seed_globals", "loader_seed"]
