"""Tar shard format for pre-augmented 3-frame clips: writing, manifests, reading and
streaming to DDP ranks. Depends on nothing else in this project.

Every location is an fsspec URL (local path, file://, s3://, gs://, http(s):// for reading,
memory:// in tests). Every write is atomic: readers never see a partial shard or manifest.

Sample (what producers write and readers get back per clip)::

    {"__key__": str (unique in the set, no dots),
     "frames": np.uint8 (3, H, W, 3) RGB, "masks": np.uint8 (3, H, W) object ids,
     "meta": JSON-serialisable dict}

Writing
-------
write_shard(url, samples) -> ShardInfo
    Encode and write ONE complete shard (`url` ends with .tar) atomically; the job driver
    names shards itself (e.g. `<set>/shard-000123.tar`) so work units can be resumed.
write_encoded_shard(url, encoded) -> ShardInfo
    The same for samples already encoded with encode_sample (e.g. in worker processes).
ShardWriter(url_dir, prefix="shard", max_count=1000, max_bytes=256 MiB)
    Context manager; `.write(sample)`; rolls over by count and size to
    `<url_dir>/<prefix>-NNNNNN.tar`; `.close()` returns list[ShardInfo] (also `.infos`).
ShardInfo(name, count, bytes, sha256)
Manifest(version, schema, shards: list[ShardInfo], config: dict)   (.num_samples)
write_manifest(url_dir, manifest) -> url        atomic `<url_dir>/manifest.json`
read_manifest(url_dir) -> Manifest              raises ManifestError with the fix
merge_manifests(list[Manifest]) -> Manifest     sorted by name; rejects duplicate shard
                                                names and differing version/schema/config
encode_sample(sample) -> dict[str, bytes]       members: frames.jpg (the 3 frames as one
decode_sample(members) -> sample                vertical JPEG strip), masks.u8.zlib, soft.u8.zlib
                                                (static clips only: 8-bit soft masks),
                                                meta.json (see shards.codec for why)

Reading
-------
iter_shard(url, info=None, verify=True) -> iterator of member dicts (decode_sample them)
iter_samples(url_dir, verify=True) -> iterator of decoded samples of a whole set, in order

Streaming to DDP ranks (torch)
------------------------------
ShardSource(url_dir, weight=1.0, start=0, stop=None)
                                       one shard set in a mix; weight 5 = five passes over
                                       each clip per epoch; samples [start, stop) only
                                       (phases sharing a set read disjoint ranges)
make_loader(sources, batch_size, rank=0, world_size=1, num_workers=0, seed=0,
            shuffle_buffer=..., verify=True, max_bad_fraction=...) -> ClipLoader
ClipLoader:  `for batch in loader` runs the rest of the current epoch, then the loader
             moves to the next epoch. Batch = {"frames": uint8 (B,3,H,W,3),
             "masks": uint8 (B,3,H,W), "meta": [dict]*B, "__key__": [str]*B}.
             len(loader) = batches per epoch (equal on every rank);
             .state_dict() / .load_state_dict(state): exact resume (same batches from N
             on); a different world size, worker count or batch size re-plans the rest of
             the epoch without repeating or skipping a sample; .stats (samples read, bad
             samples, bad shards); .epoch.
ClipStream: the torch IterableDataset behind ClipLoader (yields whole batches).
The epoch plan (shards.plan) is a pure function of the manifests, weights, seed and epoch.

Storage (shards.storage, the one module that talks to fsspec): join(url_dir, name),
exists(url), size(url), listdir(url), read_bytes(url), read_verified(url, size, sha256),
open_read(url), write_bytes_atomic(url, data), configure(options); remote requests are
retried (retry_count()), errors name the URL, never a credential. Remote shards are
fetched ahead (shards.fetch) through an optional node cache (shards.cache); make_loader's
prefetch, cache_dir and cache_limit.

Tools' library side: shards.verify.verify_shard_set, shards.contact_sheet.write_contact_sheet,
shards.bench.run_benchmark, shards.sample_clips (synthetic clips for tests/benchmarks).
FFCV (optional): shards.ffcv_backend.convert_to_beton / BetonLoader.
Errors: ManifestError, ShardError (whole shard), SampleDecodeError (one sample),
BadDataError (too many bad samples: the loader stops).
"""
from .codec import SampleDecodeError, decode_sample, encode_sample
from .manifest import (
    FORMAT_VERSION,
    Manifest,
    ManifestError,
    ShardInfo,
    merge_manifests,
    read_manifest,
    write_manifest,
)
from .reader import ShardError, iter_samples, iter_shard
from .writer import ShardWriter, write_encoded_shard, write_shard

# The streaming loader needs torch; CPU preprocessing jobs (pipelines/) write shards without
# it, so shards.stream is imported on first use of one of its names.
_STREAM_NAMES = ("BadDataError", "BadDataWarning", "ClipLoader", "ClipStream", "LoaderStats",
                 "ShardSource", "make_loader")


def __getattr__(name):
    if name in _STREAM_NAMES:
        from . import stream
        return getattr(stream, name)
    raise AttributeError(f"module 'shards' has no attribute {name!r}")

__all__ = [
    "BadDataError", "BadDataWarning", "ClipLoader", "ClipStream", "LoaderStats", "ShardSource",
    "make_loader", "FORMAT_VERSION", "Manifest", "ManifestError", "SampleDecodeError", "ShardError",
    "ShardInfo", "ShardWriter", "decode_sample", "encode_sample", "iter_samples", "iter_shard",
    "merge_manifests", "read_manifest", "write_encoded_shard", "write_manifest", "write_shard",
]
