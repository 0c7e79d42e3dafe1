"""Shard sets are plain webdataset tars: webdataset's own reader sees the same samples."""

import numpy as np
import webdataset as wds

from shards import decode_sample, iter_shard, write_shard


def _clip(key: str, shift: int) -> dict:
    # Smooth content, so the JPEG round trip stays close to the original.
    y, x = np.mgrid[0:32, 0:32]
    frame = np.stack([(x * 8 + shift) % 256, y * 8, (x + y) * 4], axis=-1).astype(np.uint8)
    masks = np.zeros((3, 32, 32), np.uint8)
    masks[:, 4:20, 4 + shift % 8:20] = 1
    masks[:, 22:30, 22:30] = 2
    return {"__key__": key, "frames": np.stack([frame] * 3), "masks": masks,
            "meta": {"source": "test", "objects": [1, 2]}}


def test_webdataset_reads_our_shards(tmp_path):
    clips = [_clip(f"clip-{i:03d}", i) for i in range(5)]
    url = str(tmp_path / "shard-000000.tar")
    write_shard(url, clips)

    theirs = list(wds.WebDataset(url, shardshuffle=False))
    ours = list(iter_shard(url))
    assert [s["__key__"] for s in theirs] == [c["__key__"] for c in clips]
    assert len(ours) == len(theirs)
    for raw, our, clip in zip(theirs, ours, clips):
        sample, our = decode_sample(raw), decode_sample(our)
        assert np.array_equal(sample["frames"], our["frames"])
        assert np.array_equal(sample["masks"], clip["masks"])
        assert sample["meta"] == our["meta"] and sample["meta"]["objects"] == [1, 2]
        assert np.abs(sample["frames"].astype(int) - clip["frames"].astype(int)).mean() < 3
