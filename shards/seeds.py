"""Random streams by name: every seeded generator of the loader and the trainer comes from here.

A stream is keyed by the run's seed, its own name and named parts (epoch=2, rank=1, ...), the
things its draws really depend on. The key goes through numpy's SeedSequence as the seed plus
a spawn key of hashed words, so two different keys never meet the way arithmetic seeds do
(`seed * 7919 + rank` for rank 1 is rank 0's `+ iteration` for iteration 1) nor the way short
entropy lists do (numpy pads them with zeros: `default_rng([5, 0])` is `default_rng([5])`).
Parts are named, so their order does not matter and adding one cannot shift the others.
"""
from __future__ import annotations

import hashlib

import numpy as np


def _words(text: str) -> list[int]:
    """Two 32-bit words of the text's SHA-256: every part adds the same number of words."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return [int.from_bytes(digest[i:i + 4], "little") for i in (0, 4)]


def seed_sequence(seed: int, stream: str, **key: int | str) -> np.random.SeedSequence:
    """The SeedSequence of stream `stream` under run seed `seed` with the named key parts."""
    if int(seed) < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    words = _words(stream) + [w for name in sorted(key) for w in _words(f"{name}={key[name]}")]
    return np.random.SeedSequence(int(seed), spawn_key=tuple(words))


def rng(seed: int, stream: str, **key: int | str) -> np.random.Generator:
    """A numpy Generator for the keyed stream (see `seed_sequence`)."""
    return np.random.default_rng(seed_sequence(seed, stream, **key))


def derived_seed(seed: int, stream: str, **key: int | str) -> int:
    """A non-negative 63-bit integer seed of the keyed stream, for APIs that take an int
    (torch.Generator.manual_seed, torch.manual_seed, random.seed, a loader's seed)."""
    return int(seed_sequence(seed, stream, **key).generate_state(1, np.uint64)[0] >> np.uint64(1))


__all__ = ["seed_sequence", "rng", "derived_seed"]
