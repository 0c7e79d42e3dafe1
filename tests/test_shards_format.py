"""Shard format: codec, atomic writing, manifests, reading back (local and memory://)."""
import io
import tarfile
import uuid

import numpy as np
import pytest

import shards
from shards import storage
from shards.sample_clips import make_clip


def clips(n, size=32, seed=0, prefix="vid"):
    rng = np.random.default_rng(seed)
    return [make_clip(rng, f"{prefix}-{i:04d}", size=size) for i in range(n)]


def assert_same_clip(got, want, max_jpeg_err=12):
    assert got["__key__"] == want["__key__"]
    assert got["frames"].dtype == np.uint8 and got["frames"].shape == want["frames"].shape
    np.testing.assert_array_equal(got["masks"], want["masks"])  # label maps are lossless
    err = np.abs(got["frames"].astype(int) - want["frames"].astype(int)).mean()
    assert err < max_jpeg_err
    assert got["meta"] == want["meta"]


def test_codec_round_trip_and_numpy_meta():
    clip = clips(1)[0]
    clip["meta"]["aug"] = {"angle": np.float32(1.5), "ids": np.array([1, 2])}
    back = shards.decode_sample(shards.encode_sample(clip))
    assert back["meta"]["aug"] == {"angle": 1.5, "ids": [1, 2]}
    assert_same_clip(back, {**clip, "meta": back["meta"]})


@pytest.mark.parametrize("bad", [
    {"__key__": "a.b"}, {"frames": np.zeros((3, 8, 8), np.uint8)},
    {"masks": np.zeros((3, 8, 9), np.uint8)}, {"meta": {"x": object()}}])
def test_encode_rejects_bad_samples_with_a_clear_error(bad):
    sample = {"__key__": "k", "frames": np.zeros((3, 8, 8, 3), np.uint8),
              "masks": np.zeros((3, 8, 8), np.uint8), "meta": {}}
    with pytest.raises(ValueError, match="sample|__key__"):
        shards.encode_sample({**sample, **bad})


def test_decode_names_missing_member():
    members = shards.encode_sample(clips(1)[0])
    del members["masks.u8.zlib"]
    with pytest.raises(shards.SampleDecodeError, match="vid-0000.*masks"):
        shards.decode_sample(members)


@pytest.mark.parametrize("kind", ["local", "file", "memory"])
def test_writer_manifest_round_trip(tmp_path, kind):
    root = {"local": str(tmp_path / "set"), "file": f"file://{tmp_path}/set",
            "memory": f"memory://rt-{uuid.uuid4().hex}/set"}[kind]
    data = clips(7)
    with shards.ShardWriter(root, max_count=3) as writer:
        for clip in data:
            writer.write(clip)
    infos = writer.infos
    assert [i.count for i in infos] == [3, 3, 1]
    assert [i.name for i in infos] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    shards.write_manifest(root, shards.Manifest(shards=infos, config={"size": 32}))
    manifest = shards.read_manifest(root)
    assert manifest.num_samples == 7 and manifest.config == {"size": 32}
    back = list(shards.iter_samples(root))
    assert len(back) == 7
    for got, want in zip(back, data):
        assert_same_clip(got, want)
    fs, path = storage.filesystem(root)
    assert not [p for p in fs.ls(path, detail=False) if ".tmp-" in p]  # no temp files left


def test_writer_rolls_over_by_size():
    root = f"memory://size-{uuid.uuid4().hex}"
    two = shards.write_shard(f"{root}/probe/two.tar", clips(2)).bytes
    with shards.ShardWriter(f"{root}/set", max_count=100, max_bytes=two) as writer:
        for clip in clips(6):
            writer.write(clip)
    counts = [i.count for i in writer.infos]
    assert sum(counts) == 6 and counts[0] == 2 and max(counts) <= 2  # the probe's pair fits
    assert all(i.bytes <= two for i in writer.infos)


def test_write_shard_is_deterministic_and_named_by_caller():
    root = f"memory://ws-{uuid.uuid4().hex}"
    a = shards.write_shard(f"{root}/a/shard-000123.tar", clips(3))
    b = shards.write_shard(f"{root}/b/shard-000123.tar", clips(3))
    assert a.name == "shard-000123.tar" and a.count == 3
    assert a.sha256 == b.sha256 and a.bytes == b.bytes
    with pytest.raises(ValueError, match="twice"):
        shards.write_shard(f"{root}/c/shard-000000.tar", clips(2) + clips(1))


def test_failed_write_leaves_nothing_behind():
    root = f"memory://fail-{uuid.uuid4().hex}"

    def broken():
        yield clips(1)[0]
        raise RuntimeError("producer died")

    with pytest.raises(RuntimeError):
        shards.write_shard(f"{root}/shard-000000.tar", broken())
    assert not storage.filesystem("memory://")[0].exists(f"/{root[9:]}/shard-000000.tar")


def test_merge_manifests_sorts_and_rejects_conflicts():
    def info(name):
        return shards.ShardInfo(name, 2, 10, "0" * 64)

    a = shards.Manifest(shards=[info("shard-000002.tar")], config={"seed": 1})
    b = shards.Manifest(shards=[info("shard-000000.tar"), info("shard-000001.tar")],
                        config={"seed": 1})
    merged = shards.merge_manifests([a, b])
    assert [s.name for s in merged.shards] == ["shard-000000.tar", "shard-000001.tar",
                                               "shard-000002.tar"]
    assert merged.num_samples == 6
    with pytest.raises(shards.ManifestError, match="appears twice"):
        shards.merge_manifests([a, a])
    with pytest.raises(shards.ManifestError, match="config"):
        shards.merge_manifests([a, shards.Manifest(shards=[], config={"seed": 2})])


def test_soft_masks_round_trip_and_are_checked():
    """Static clips carry 8-bit soft masks (an optional member, written before meta.json);
    clips without them decode to soft None, and decoding in place zeroes the slot."""
    clip = clips(1)[0]
    soft = np.random.default_rng(1).integers(0, 256, clip["masks"].shape, dtype=np.uint8)
    members = shards.encode_sample({**clip, "soft": soft})
    back = shards.decode_sample(members)
    np.testing.assert_array_equal(back["soft"], soft)  # lossless
    out = np.full(soft.shape, 7, np.uint8)
    assert shards.decode_sample(members, soft_out=out)["soft"] is out
    np.testing.assert_array_equal(out, soft)
    assert shards.decode_sample(shards.encode_sample(clip), soft_out=out)["soft"] is None
    assert not out.any()
    with pytest.raises(ValueError, match="soft masks must be"):
        shards.encode_sample({**clip, "soft": soft[:, :-1]})
    bad = dict(members, **{"soft.u8.zlib": members["soft.u8.zlib"][:-3]})
    with pytest.raises(shards.SampleDecodeError, match="soft"):
        shards.decode_sample(bad)
    # the tar holds it before meta.json, and reading the shard back keeps it
    root = f"memory://soft-{uuid.uuid4().hex}"
    info = shards.write_shard(f"{root}/a.tar", [{**clip, "soft": soft}])
    raw = storage.filesystem("memory://")[0].cat(f"/{root[9:]}/a.tar")
    names = tarfile.open(fileobj=io.BytesIO(raw)).getnames()
    assert names.index(f"{clip['__key__']}.soft.u8.zlib") < names.index(f"{clip['__key__']}.meta.json")
    shards.write_manifest(root, shards.Manifest(shards=[info]))
    np.testing.assert_array_equal(next(shards.iter_samples(root))["soft"], soft)


def test_older_format_versions_are_refused_with_the_fix():
    root = f"memory://old-{uuid.uuid4().hex}"
    manifest = shards.Manifest(version=1).to_json()
    storage.filesystem("memory://")[0].pipe(f"/{root[9:]}/manifest.json", manifest.encode())
    with pytest.raises(shards.ManifestError, match=r"version 1 is older.*remake.*tools/make_shards"):
        shards.read_manifest(root)


def test_read_manifest_errors_are_clear():
    root = f"memory://nomani-{uuid.uuid4().hex}"
    with pytest.raises(shards.ManifestError, match="no manifest"):
        shards.read_manifest(root)
    storage.filesystem("memory://")[0].pipe(f"/{root[9:]}/manifest.json", b'{"version": 99}')
    with pytest.raises(shards.ManifestError, match="not a valid"):
        shards.read_manifest(root)


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_reader_reads_standard_tars_and_is_strict(fmt):
    from shards.reader import iter_tar

    names = ["a/" + "k" * 120 + ".frames.jpg", "short.meta.json", "d" * 90 + "/x.y"]
    if fmt == tarfile.USTAR_FORMAT:
        names = names[1:]  # ustar cannot hold the 130-character name
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        directory = tarfile.TarInfo("a-directory")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)  # not a file: skipped
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size = 700 * i + 3
            tar.addfile(info, io.BytesIO(bytes([i]) * info.size))
    data = buf.getvalue()
    got = list(iter_tar(io.BytesIO(data)))
    assert [n for n, _ in got] == names
    assert [len(d) for _, d in got] == [700 * i + 3 for i in range(len(names))]
    last = tarfile.open(fileobj=io.BytesIO(data)).getmembers()[-1]
    boundary = last.offset_data + -(-last.size // 512) * 512  # end of the last member
    with pytest.raises(EOFError, match="end-of-archive"):
        list(iter_tar(io.BytesIO(data[:boundary])))  # cut exactly at a member boundary
    bad = bytearray(data)
    bad[600] ^= 0x55  # inside the second header
    with pytest.raises(ValueError, match="checksum"):
        list(iter_tar(io.BytesIO(bytes(bad))))


def test_writing_side_does_not_load_torch():
    # preprocessing jobs write shards on CPU machines without importing torch
    import subprocess
    import sys

    code = ("import sys, shards; shards.write_shard; shards.read_manifest; shards.iter_samples; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_hands_soft_masks_to_the_trainer(workers, tmp_path):
    """Batches with static clips carry "soft" (zero for clips without) and "has_soft";
    batches of video clips only have neither."""
    import torch

    rng = np.random.default_rng(5)
    data = clips(12, size=16, seed=5)
    softs = {}
    root = str(tmp_path / "set")  # (DataLoader workers do not see the parent's memory://)
    with shards.ShardWriter(root, max_count=4) as writer:
        for i, clip in enumerate(data):
            if i % 3 == 0:
                softs[clip["__key__"]] = rng.integers(1, 256, clip["masks"].shape, dtype=np.uint8)
                clip = {**clip, "soft": softs[clip["__key__"]]}
            writer.write(clip)
    shards.write_manifest(root, shards.Manifest(shards=writer.infos))
    seen = 0
    for batch in shards.make_loader(root, batch_size=3, num_workers=workers, seed=1):
        if not any(k in softs for k in batch["__key__"]):
            assert "soft" not in batch and "has_soft" not in batch
            continue
        assert batch["soft"].shape == batch["masks"].shape and batch["soft"].dtype == torch.uint8
        for slot, key in enumerate(batch["__key__"]):
            assert bool(batch["has_soft"][slot]) == (key in softs)
            if key in softs:
                np.testing.assert_array_equal(batch["soft"][slot].numpy(), softs[key])
                seen += 1
            else:
                assert not batch["soft"][slot].any()
    assert seen == len(softs)


def test_image_conventions_have_one_home():
    from shards import contact_sheet
    from shards.images import davis_palette, object_colour, shorter_side_size

    import pipelines.synthetic.palette as synthetic_palette
    from stcn import evaluation

    palette = np.frombuffer(davis_palette(), np.uint8).reshape(256, 3)
    # the PASCAL VOC colour map: 1 dark red, 2 dark green, 3 olive, 4 navy, 255 light grey
    assert palette[:5].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128]]
    assert palette[255].tolist() == [224, 224, 192]
    assert synthetic_palette.davis_palette is evaluation.davis_palette is davis_palette
    assert contact_sheet.object_colour is object_colour
    # torchvision's Resize(int): the shorter side becomes `size`, the longer one is truncated
    assert shorter_side_size(854, 480, 384) == (683, 384)
    assert shorter_side_size(480, 854, 384) == (384, 683)
    assert shorter_side_size(500, 500, 384) == (384, 384)
