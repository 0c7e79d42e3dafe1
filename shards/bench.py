"""Loader throughput against a pure-decode floor, measured in one run (tools/bench_loader).

floor:      decode the same samples, already in memory, into batch arrays; one process,
            no tar parsing, I/O, shuffling or torch. No loader can beat it per process.
tar, 1 process / N workers: one full epoch of `make_loader` (all its work included).
beton:      one epoch of the FFCV loader over the same samples (optional).

A remote set (s3://, http(s)://, ...) is measured against a local copy of itself
(`run_remote_benchmark`): one epoch each of the local copy, the remote set streamed with
prefetch, through a cold node cache and through the warm cache, and the remote/local ratios.
"""
from __future__ import annotations

import time
import warnings

import numpy as np

from . import storage
from .codec import JPEG_DECODER, SampleDecodeError, decode_sample
from .manifest import read_manifest
from .reader import ShardError, iter_shard
from .stream import BadDataWarning, make_loader

# FFCV loaders stay referenced until exit: collecting one earlier makes numba's finalizers
# print harmless "Exception ignored" tracebacks.
_KEEP_ALIVE: list = []


def _raw_samples(url_dir: str, verify: bool = False) -> tuple[list[dict[str, bytes]], int]:
    """(the samples that decode, how many of the manifest's samples do not); with verify,
    a shard failing its checksum counts whole, as the loader counts it."""
    raw, bad = [], 0
    for info in read_manifest(url_dir).shards:
        read = 0
        try:
            for members in iter_shard(storage.join(url_dir, info.name), info, verify=verify):
                read += 1
                try:
                    decode_sample(members)
                except SampleDecodeError:
                    bad += 1
                    continue
                raw.append(members)
        except ShardError:
            pass  # a truncated or damaged shard: the samples it lacks count as bad
        bad += max(0, info.count - read)
    return raw, bad


def decode_floor(raw: list[dict[str, bytes]], batch_size: int, repeats: int = 1) -> float:
    """Clips/s decoding `raw` into reused batch arrays (the best case of any loader)."""
    first = decode_sample(raw[0])
    frames = np.empty((batch_size,) + first["frames"].shape, np.uint8)
    masks = np.empty((batch_size,) + first["masks"].shape, np.uint8)
    start = time.perf_counter()
    for _ in range(repeats):
        for i, members in enumerate(raw):
            decode_sample(members, frames[i % batch_size], masks[i % batch_size])
    return repeats * len(raw) / (time.perf_counter() - start)


def _loader(url_dir: str, batch_size: int, workers: int, seed: int, verify: bool):
    # Bad samples are counted (results["bad_samples"]), not fatal: the loader substitutes
    # duplicates for them, so the set is still measured.
    return make_loader(url_dir, batch_size, num_workers=workers, seed=seed, verify=verify,
                       max_bad_fraction=1.0)


def _epoch_rate(loader) -> float:
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadDataWarning)  # counted once in the results
        clips = sum(len(batch["__key__"]) for batch in loader)
    return clips / (time.perf_counter() - start)


def run_benchmark(url_dir: str, batch_size: int = 32, workers: int = 2,
                  beton: str | None = None, verify: bool = True, seed: int = 0,
                  repeats: int = 3) -> dict:
    """Figures in clips/s (see the module docstring); 'ratio' is tar 1 process / floor.

    The floor and the 1-process loader are measured alternately `repeats` times and the
    best of each kept, so both see the same machine load (shared machines are noisy)."""
    raw, bad = _raw_samples(url_dir, verify)  # also warms the page cache for the timed runs
    if len(raw) < batch_size:
        raise ValueError(f"{url_dir}: {len(raw)} readable samples, fewer than one batch of "
                         f"{batch_size}; lower --batch-size")
    results = {"samples": len(raw), "bad_samples": bad, "batch_size": batch_size,
               "jpeg_decoder": JPEG_DECODER,
               "clip_shape": list(decode_sample(raw[0])["frames"].shape), "verify": verify,
               "repeats": repeats, "floor": 0.0, "tar_1_process": 0.0}
    for _ in range(repeats):
        results["floor"] = max(results["floor"], decode_floor(raw, batch_size))
        results["tar_1_process"] = max(results["tar_1_process"], _epoch_rate(
            _loader(url_dir, batch_size, 0, seed, verify)))
    results["ratio"] = results["tar_1_process"] / results["floor"]
    if workers > 0:
        results[f"tar_{workers}_workers"] = max(_epoch_rate(
            _loader(url_dir, batch_size, workers, seed, verify))
            for _ in range(repeats))
    if beton:
        from .ffcv_backend import BetonLoader

        for n in sorted({1, max(1, workers)}):
            loaders = [BetonLoader(beton, batch_size, num_workers=n, seed=seed)
                       for _ in range(repeats)]
            _KEEP_ALIVE.extend(loaders)
            results[f"beton_{n}_workers"] = max(_epoch_rate(loader) for loader in loaders)
    return results


def run_remote_benchmark(url_dir: str, batch_size: int = 32, workers: int = 2,
                         prefetch: int | None = None, verify: bool = True, seed: int = 0,
                         repeats: int = 3) -> dict:
    """Clips/s of the remote set at `url_dir` next to a local copy of it (module doc)."""
    import os
    import shutil
    import tempfile

    from .fetch import DEFAULT_PREFETCH

    prefetch = DEFAULT_PREFETCH if prefetch is None else prefetch
    manifest = read_manifest(url_dir)
    total = sum(s.bytes for s in manifest.shards)
    results = {"remote": storage.redact(url_dir), "samples": manifest.num_samples,
               "batch_size": batch_size, "workers": workers, "prefetch": prefetch,
               "verify": verify, "repeats": repeats, "shard_bytes": total}
    work = tempfile.mkdtemp(prefix="bench-remote-")
    try:
        local = os.path.join(work, "local")
        for name in ["manifest.json"] + [s.name for s in manifest.shards]:
            storage.write_bytes_atomic(os.path.join(local, name),
                                       storage.read_bytes(storage.join(url_dir, name)))

        def rate(url, **fetch):
            return _epoch_rate(make_loader(url, batch_size, num_workers=workers, seed=seed,
                                           verify=verify, max_bad_fraction=1.0,
                                           prefetch=prefetch, **fetch))

        best = {"local": 0.0, "remote_prefetch": 0.0, "remote_cold_cache": 0.0,
                "remote_warm_cache": 0.0}
        for i in range(repeats):
            # interleaved, in alternating order: every figure sees the same machine load
            cache = {"cache_dir": os.path.join(work, f"cache{i}"), "cache_limit": 2 * total + 1}
            runs = [("local", lambda: rate(local)), ("remote_prefetch", lambda: rate(url_dir)),
                    ("remote_cold_cache", lambda cache=cache: rate(url_dir, **cache)),
                    ("remote_warm_cache", lambda cache=cache: rate(url_dir, **cache))]
            for name, run in (runs if i % 2 == 0 else runs[2:] + runs[:2]):
                best[name] = max(best[name], run())
            shutil.rmtree(cache["cache_dir"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results.update(best)
    for name in ("remote_prefetch", "remote_cold_cache", "remote_warm_cache"):
        results[f"ratio_{name}"] = best[name] / best["local"]
    return results


def format_remote_results(results: dict) -> str:
    lines = [f"{results['remote']}: {results['samples']} clips, "
             f"{results['shard_bytes'] / 1e6:.1f} MB of shards, batch {results['batch_size']}, "
             f"{results['workers']} workers, prefetch {results['prefetch']}, "
             f"verify={results['verify']}, best of {results['repeats']}"]
    for name in ("local", "remote_prefetch", "remote_cold_cache", "remote_warm_cache"):
        ratio = results.get(f"ratio_{name}")
        lines.append(f"  {name.replace('_', ' '):20s} {results[name]:8.1f} clips/s"
                     + (f"   remote/local {ratio:6.1%}" if ratio is not None else ""))
    return "\n".join(lines)


def format_results(results: dict) -> str:
    lines = [f"{results['samples']} clips {results['clip_shape']}, "
             f"{results.get('bad_samples', 0)} bad samples (unreadable; the loader substitutes "
             f"duplicates), batch {results['batch_size']}, "
             f"JPEG decoder {results['jpeg_decoder']}, verify={results['verify']}, "
             f"best of {results['repeats']}"]
    for name, value in results.items():
        if name == "ratio":
            lines.append(f"  {'tar 1 process / floor':24s} {value:8.1%}")
        elif isinstance(value, float):
            lines.append(f"  {name.replace('_', ' '):24s} {value:8.1f} clips/s")
    return "\n".join(lines)
