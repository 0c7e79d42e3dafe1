"""Bad data: truncated tar, corrupt JPEG, missing member, checksum mismatch. The loader
skips with a warning naming shard and key, counts it, keeps the batch count, never hangs,
and stops with a clear error past max_bad_fraction."""
import hashlib
import io
import tarfile
import uuid

import numpy as np
import pytest

import shards
from shards import storage
from shards.sample_clips import make_clip

N, PER_SHARD = 24, 6


def encoded(prefix, n, start=0):
    rng = np.random.default_rng(start)
    return [shards.encode_sample(make_clip(rng, f"{prefix}-{i:03d}", size=16, n_objects=2))
            for i in range(start, start + n)]


def raw_tar(samples):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for members in samples:
            for name, data in members.items():
                if name == "__key__":
                    continue
                info = tarfile.TarInfo(f"{members['__key__']}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def make_set(damage=None):
    """A 4-shard set; `damage(shard_index, samples)` may alter samples before writing,
    or return replacement bytes for the shard file (the manifest keeps the good digest)."""
    root = f"memory://bad-{uuid.uuid4().hex}"
    fs = storage.filesystem("memory://")[0]
    infos = []
    for s in range(N // PER_SHARD):
        samples = encoded("v", PER_SHARD, start=s * PER_SHARD)
        name = f"shard-{s:06d}.tar"
        good = raw_tar(samples)
        data = good
        if damage is not None:
            result = damage(s, samples)
            if isinstance(result, bytes):
                data = result(good) if callable(result) else result
            else:
                data = raw_tar(samples)
                good = data  # content damage keeps a matching checksum
        fs.pipe(f"/{root[9:]}/{name}", data)
        infos.append(shards.ShardInfo(name, PER_SHARD, len(good),
                                      hashlib.sha256(good).hexdigest()))
    shards.write_manifest(root, shards.Manifest(shards=infos))
    return root


def run(root, workers=0, **kw):
    kw.setdefault("max_bad_fraction", 0.5)
    loader = shards.make_loader(root, batch_size=4, num_workers=workers, shuffle_buffer=4, **kw)
    batches = list(loader)
    assert len(batches) == N // 4  # bad data never changes the batch count
    return loader, batches


def corrupt_jpeg(shard, samples):
    if shard == 2:
        jpg = samples[3]["frames.jpg"]
        samples[3]["frames.jpg"] = jpg[:200] + bytes(len(jpg) - 400) + jpg[-200:]


def drop_member(shard, samples):
    if shard == 1:
        del samples[2]["masks.u8.zlib"]


@pytest.mark.parametrize("damage,key", [(corrupt_jpeg, "v-015"), (drop_member, "v-008")])
def test_bad_sample_is_skipped_with_a_warning_naming_shard_and_key(damage, key):
    root = make_set(damage)
    with pytest.warns(shards.BadDataWarning, match=rf"shard-00000\d\.tar key {key}"):
        loader, batches = run(root)
    assert loader.stats.bad_samples == 1 and loader.stats.substituted == 1
    assert loader.stats.samples_read == N - 1 and loader.stats.bad_shards == 0
    keys = [k for b in batches for k in b["__key__"]]
    assert key not in keys and len(set(keys)) == N - 1  # the slot holds a duplicate


@pytest.mark.parametrize("verify", [True, False])
def test_truncated_shard(verify):
    def truncate(shard, samples):
        if shard == 3:
            return raw_tar(samples)[:5000]  # cut inside the second sample
    root = make_set(truncate)
    with pytest.warns(shards.BadDataWarning, match="shard-000003.tar"):
        loader, _ = run(root, verify=verify)
    assert loader.stats.bad_shards == 1
    # verified: the whole shard is rejected on open; streamed: the complete first sample
    # before the cut is kept
    assert loader.stats.bad_samples == (PER_SHARD if verify else PER_SHARD - 1)


def test_checksum_mismatch_rejects_the_shard_when_verifying():
    def flip(shard, samples):
        if shard == 0:
            data = bytearray(raw_tar(samples))
            data[3000] ^= 0xFF
            return bytes(data)
    root = make_set(flip)
    with pytest.warns(shards.BadDataWarning, match="shard-000000.tar: sha256"):
        loader, _ = run(root)
    assert loader.stats.bad_shards == 1 and loader.stats.bad_samples == PER_SHARD


def test_missing_shard_file():
    root = make_set()
    storage.filesystem("memory://")[0].rm(f"/{root[9:]}/shard-000001.tar")
    with pytest.warns(shards.BadDataWarning, match="shard-000001.tar: not found"):
        loader, _ = run(root)
    assert loader.stats.bad_shards == 1


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 2])
def test_too_many_bad_samples_stop_with_a_clear_error_and_never_hang(workers):
    def break_all_jpegs(shard, samples):
        if shard in (0, 1):
            for s in samples:
                s["frames.jpg"] = b"not a jpeg"
    root = make_set(break_all_jpegs)
    with pytest.warns(shards.BadDataWarning) if workers == 0 else _no_check():
        with pytest.raises(shards.BadDataError, match="max_bad_fraction=0.1.*verify_shards"):
            run(root, workers=workers, max_bad_fraction=0.1)


class _no_check:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("seed", range(4))
def test_a_stream_starting_with_broken_shards_still_fills_its_batches(seed):
    def break_three(shard, samples):
        if shard != 2:
            return b"\0" * 100  # not even a tar
    root = make_set(break_three)
    with pytest.warns(shards.BadDataWarning):
        loader, batches = run(root, max_bad_fraction=0.9, seed=seed)
    assert loader.stats.bad_shards == 3 and loader.stats.bad_samples == 3 * PER_SHARD
    keys = {k for b in batches for k in b["__key__"]}
    assert keys <= {f"v-{i:03d}" for i in range(12, 18)}  # only shard 2's samples
