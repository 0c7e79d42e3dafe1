"""The shard tools (verify, convert to FFCV, contact sheet, loader benchmark), run
in-process through their click commands."""
import hashlib
import uuid

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import shards
from shards import storage
from shards.sample_clips import write_synthetic_set
from shards.writer import tar_bytes

from conftest import load_tool


def tool(name):
    return load_tool(name).main


def invoke(name, *args):
    return CliRunner().invoke(tool(name), [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def small_set():
    root = f"memory://tools-{uuid.uuid4().hex}"
    write_synthetic_set(root, 10, size=32, max_count=4, progress=False)
    return root


def test_verify_passes_a_good_set(small_set):
    result = invoke("verify_shards", small_set, "--quiet")
    assert result.exit_code == 0 and "3 shards, 10 samples, 0 problems" in result.output


@pytest.mark.parametrize("damage,expect", [
    ("flip", "sha256 does not match"), ("remove", "missing"), ("truncate", "bytes, manifest says"),
    ("undecodable", "sample"), ("no manifest", "no manifest")])
def test_verify_reports_problems_and_fails(damage, expect):
    root = f"memory://verify-{uuid.uuid4().hex}"
    write_synthetic_set(root, 10, size=32, max_count=4, progress=False)
    fs, path = storage.filesystem("memory://")[0], root[len("memory://"):]
    shard = f"/{path}/shard-000001.tar"
    data = bytearray(fs.cat(shard))
    if damage == "flip":
        data[2000] ^= 0xFF
        fs.pipe(shard, bytes(data))
    elif damage == "remove":
        fs.rm(shard)
    elif damage == "truncate":
        fs.pipe(shard, bytes(data[:3000]))
    elif damage == "undecodable":
        # a valid tar whose JPEG is garbage, with the manifest updated to match it
        members = list(shards.iter_shard(f"memory://{path}/shard-000001.tar"))
        members[0]["frames.jpg"] = b"garbage"
        tar, count = tar_bytes(members)
        fs.pipe(shard, tar)
        manifest = shards.read_manifest(root)
        manifest.shards[1] = shards.ShardInfo("shard-000001.tar", count, len(tar),
                                              hashlib.sha256(tar).hexdigest())
        shards.write_manifest(root, manifest)
    else:
        fs.rm(f"/{path}/manifest.json")
    result = CliRunner().invoke(tool("verify_shards"), [root, "--quiet"])
    assert result.exit_code == 1
    assert expect in result.output


@pytest.mark.slow  # writes and reads a .beton file
def test_ffcv_round_trip(tmp_path):
    pytest.importorskip("ffcv")
    from shards.ffcv_backend import BetonLoader

    root = str(tmp_path / "set")
    write_synthetic_set(root, 10, size=32, max_count=4, progress=False)
    beton = tmp_path / "set.beton"
    result = invoke("convert_shards", root, beton, "--to", "ffcv")
    assert result.exit_code == 0 and beton.exists()
    want = {s["__key__"]: s for s in shards.iter_samples(root)}
    seen = []
    for batch in BetonLoader(str(beton), batch_size=4, shuffle=False, drop_last=False):
        assert batch["frames"].dtype == torch.uint8 and batch["frames"].shape[1:] == (3, 32, 32, 3)
        for i, key in enumerate(batch["__key__"]):
            seen.append(key)
            np.testing.assert_array_equal(batch["masks"][i].numpy(), want[key]["masks"])
            assert batch["meta"][i] == want[key]["meta"]
            # same JPEG bytes; FFCV's decoder may round a few levels differently
            diff = np.abs(batch["frames"][i].numpy().astype(int) - want[key]["frames"].astype(int))
            assert diff.mean() < 2 and diff.max() <= 16
    assert seen == sorted(want)


def test_contact_sheet_is_written(small_set):
    out = f"{small_set}-sheet/sheet.png"
    result = invoke("inspect_shards", small_set, "--out", out, "--count", "3", "--thumb", "40")
    assert result.exit_code == 0
    png = storage.read_bytes(out)
    sheet = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert sheet.shape[1] == 3 * 40 and sheet.shape[0] > 3 * 40
    assert sheet.std() > 10  # an image, not a blank page


def test_bench_loader_prints_all_figures(small_set):
    result = invoke("bench_loader", small_set, "--workers", "1", "--batch-size", "4",
                    "--repeats", "1")
    assert result.exit_code == 0
    for line in ("floor", "tar 1 process", "tar 1 process / floor", "tar 1 workers"):
        assert line in result.output
