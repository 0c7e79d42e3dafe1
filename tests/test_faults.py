"""Fault injection: crafted files, corrupt and truncated data, interrupts, divergence,
concurrent jobs, disk full. Every fault of issue 11's table has a test here; run them alone
with `python3 -m pytest -m faults`.

Training runs are tiny (32x32 crops, batch 1, CPU); signals go to a process group started
with its own session, as a terminal's Ctrl-C or a scheduler's preemption would.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import shards
from shards import errors, storage
from shards.lease import Lease, LeaseHeld, job_identity
from shards.sample_clips import make_clip
from stcn.checkpoint import (CheckpointError, CheckpointManager, capture_rng_states,
                             load_checkpoint, restore_rng_states)

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[1]
OLD_CHECKPOINT = REPO / "tests" / "data" / "checkpoint_v0_000000002.pt"
SIZE = 32
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


# ----------------------------------------------------------------------------- helpers
class Payload:
    """Pickles to a call that creates `marker`: what an attacker's checkpoint would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"iteration": 99, "model": {}, "payload": Payload(marker)}, path)
    return path


def write_set(url: str, clips: int = 6, per_shard: int = 3, seed: int = 0, prefix: str = "c",
              online=None) -> str:
    rng = np.random.default_rng(seed)
    infos = []
    for k in range(0, clips, per_shard):
        samples = [make_clip(rng, f"{prefix}{k // per_shard}{i}-0", size=SIZE, n_objects=1 + i % 2)
                   for i in range(min(per_shard, clips - k))]
        infos.append(shards.write_shard(f"{url}/shard-{k // per_shard:06d}.tar", samples))
    config = {"kind": "synthetic"} if online is None else {"kind": "synthetic", "online": online}
    shards.write_manifest(url, shards.Manifest(shards=infos, config=config))
    return url


def truncate(path: Path, keep: float = 1 / 3) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def tool(name: str, *args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / name), *map(str, args)],
                          capture_output=True, text=True, env=ENV, timeout=kwargs.pop("timeout", 300),
                          **kwargs)


def run_tool_here(name: str, args: list[str], capsys) -> tuple[int, str]:
    """A tool's click command in this process (no interpreter start-up): (exit, stderr+stdout)."""
    import tools

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        tools.load(name).main(args=[str(a) for a in args], prog_name=name)
    out = capsys.readouterr()
    return exit_.value.code, out.err + out.out


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("Error")]


# ============================================================== 1. untrusted checkpoints
def test_crafted_checkpoint_in_run_dir_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    crafted_checkpoint(run_dir / "checkpoint_000000099.pt", marker)
    with pytest.raises(CheckpointError) as error, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        CheckpointManager(run_dir).resolve("auto")
    assert not marker.exists()
    message = str(error.value)
    assert "checkpoint_000000099.pt" in message and "could run code" in message
    assert "--resume none" in message
    # moved aside, kept for inspection, and still reported on the next attempt
    assert (run_dir / "checkpoint_000000099.pt.unreadable").exists()
    with pytest.raises(CheckpointError, match="moved aside earlier"):
        CheckpointManager(run_dir).resolve("auto")
    assert not marker.exists()


def test_crafted_checkpoint_as_resume_path_names_the_file(tmp_path):
    marker = tmp_path / "payload-ran"
    path = crafted_checkpoint(tmp_path / "mine.pt", marker)
    with pytest.raises(CheckpointError, match=r"mine\.pt: .*posix\.system.*could run code"):
        CheckpointManager(tmp_path / "run").resolve(str(path))
    assert not marker.exists()


def test_crafted_weights_for_load_network_and_eval_model_never_run(tmp_path, capsys):
    from stcn.network import STCN
    from stcn.weights import CheckpointError as WeightsError, load_stcn_weights

    marker = tmp_path / "payload-ran"
    path = tmp_path / "weights.pth"
    torch.save({"key_encoder.conv1.weight": Payload(marker)}, path)
    with pytest.raises(WeightsError, match="weights.pth"):
        load_stcn_weights(STCN(single_object=False), path)
    assert not marker.exists()

    # tools/eval --model on a one-video folder
    import cv2
    root = tmp_path / "videos"
    for sub, ext in (("JPEGImages", "jpg"), ("Annotations", "png")):
        (root / sub / "v").mkdir(parents=True)
        for i in range(2):
            image = np.zeros((SIZE, SIZE, 3) if ext == "jpg" else (SIZE, SIZE), np.uint8)
            image[8:20, 8:20] = 200 if ext == "jpg" else 1
            if ext == "jpg" or i == 0:
                cv2.imwrite(str(root / sub / "v" / f"{i:05d}.{ext}"), image)
    code, out = run_tool_here("eval", ["generic", "--root", root, "--output", tmp_path / "out",
                                       "--model", path, "--device", "cpu"], capsys)
    assert code == 1 and not marker.exists()
    assert len(error_lines(out)) == 1 and "weights.pth" in error_lines(out)[0], out


def test_new_checkpoints_hold_only_tensors_and_plain_data(tmp_path):
    manager = CheckpointManager(tmp_path)
    path = manager.save({"iteration": 1, "model": {"w": torch.ones(2)},
                         "rng": capture_rng_states(),
                         "sample_rng": np.random.default_rng(3).bit_generator.state}, 1)
    state = torch.load(path, weights_only=True)  # no allow-list needed at all
    expected = (np.random.rand(), torch.rand(1).item())
    restore_rng_states(state["rng"])
    assert (np.random.rand(), torch.rand(1).item()) == expected
    generator = np.random.default_rng()
    generator.bit_generator.state = state["sample_rng"]
    assert generator.random() == np.random.default_rng(3).random()


def test_checkpoint_written_before_weights_only_loading_still_loads():
    """tests/data/checkpoint_v0_000000002.pt was written by the trainer of commit 94843c3
    (numpy RNG state pickled as an ndarray; network and optimizer cut to 2 entries)."""
    state = load_checkpoint(OLD_CHECKPOINT)
    assert state["iteration"] == 2 and "format" not in state
    rank = state["ranks"][0]
    assert isinstance(rank["rng"]["numpy"][1], np.ndarray) and rank["rng"]["numpy"][1].shape == (624,)
    assert rank["loader"]["state"]["legs"][0]["batches"] == 2
    restore_rng_states(rank["rng"])
    first = np.random.rand()
    restore_rng_states(rank["rng"])
    assert np.random.rand() == first
    generator = np.random.default_rng()
    generator.bit_generator.state = rank["sample_rng"]
    assert torch.is_tensor(rank["augment_rng"])


# ============================================================== 4. checkpoint fallback
def _state(iteration: int) -> dict:
    return {"iteration": iteration, "model": {"w": torch.full((2,), float(iteration))}}


def test_truncated_newest_checkpoint_falls_back_and_is_moved_aside(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    for iteration in (1, 2):
        manager.save(_state(iteration), iteration)
    truncate(manager.path_for(2), 0.5)
    with pytest.warns(UserWarning, match=r"checkpoint_000000002\.pt .*truncated or corrupt"):
        state, path = manager.resolve("auto")
    assert state["iteration"] == 1
    assert (tmp_path / "checkpoint_000000002.pt.unreadable").exists()


def test_no_loadable_checkpoint_is_an_error_listing_them_not_a_fresh_start(tmp_path):
    manager = CheckpointManager(tmp_path)
    for iteration in (3, 4):
        manager.save(_state(iteration), iteration)
        truncate(manager.path_for(iteration))
    with pytest.raises(CheckpointError) as error, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manager.resolve("auto")
    message = str(error.value)
    assert "checkpoint_000000003.pt" in message and "checkpoint_000000004.pt" in message
    assert "--resume none" in message
    # --resume none starts over and keeps the old files in superseded-*/
    assert manager.resolve(None) is None
    kept = list(tmp_path.glob("superseded-*/checkpoint_00000000[34].pt.unreadable"))
    assert len(kept) == 2
    assert manager.resolve("auto") is None  # the new run's directory is clean


def test_unreadable_checkpoints_never_push_out_a_good_one(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    for iteration in (7, 8, 9):
        manager.path_for(iteration).write_bytes(b"not a checkpoint")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError):
            manager.resolve("auto")  # moves the three aside
    manager.resolve(None)
    manager.save(_state(1), 1)
    assert manager.path_for(1).exists()
    # even unreadable files not yet moved aside: the file just written is never pruned
    for iteration in (7, 8, 9):
        manager.path_for(iteration).write_bytes(b"junk")
    manager.save(_state(2), 2)
    assert manager.path_for(2).exists()


def test_resume_path_to_a_bad_file_names_it_and_why(tmp_path):
    bad = tmp_path / "checkpoint_000000005.pt"
    CheckpointManager(tmp_path).save(_state(5), 5)
    truncate(bad)
    with pytest.raises(CheckpointError, match=r"checkpoint_000000005\.pt: truncated or corrupt"):
        CheckpointManager(tmp_path / "run").resolve(str(bad))
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(CheckpointError, match=r"text\.pt: not a PyTorch checkpoint"):
        load_checkpoint(tmp_path / "text.pt")


def test_stale_temp_files_of_a_killed_save_are_removed_at_start(tmp_path):
    manager = CheckpointManager(tmp_path, log=lambda line: logged.append(line))
    logged: list[str] = []
    stale = tmp_path / f".checkpoint_000000010.pt.tmp-{'a' * 32}"
    stale.write_bytes(b"\0" * 1000)
    other = tmp_path / f".notes.txt.tmp-{'b' * 32}"  # not ours: kept
    other.write_bytes(b"x")
    assert manager.resolve("auto") is None
    assert not stale.exists() and other.exists()
    assert len(logged) == 1 and stale.name in logged[0]


# ============================================================== 5. the loader
def test_bad_sample_takes_a_good_one_from_the_shuffle_buffer(tmp_path):
    """Seed 0 emits the truncated shard's samples first, after the reader has read every
    sample into the buffer: before the fix this failed with 'not one of its samples is
    readable'."""
    url = write_set(str(tmp_path / "set"), clips=9, per_shard=3)
    truncate(tmp_path / "set" / "shard-000001.tar")
    loader = shards.make_loader(url, 1, seed=0, max_bad_fraction=0.9)
    with pytest.warns(shards.BadDataWarning):
        keys = [batch["__key__"][0] for batch in loader]
    assert len(keys) == 9 and not any(k.startswith("c1") for k in keys)
    assert loader.stats.bad_samples == 3 and loader.stats.substituted == 3


def test_bench_loader_reports_bad_samples_as_a_count(tmp_path):
    from shards.bench import format_results, run_benchmark

    url = write_set(str(tmp_path / "set"), clips=9, per_shard=3)
    truncate(tmp_path / "set" / "shard-000002.tar")
    results = run_benchmark(url, batch_size=2, workers=0, repeats=1)
    assert results["bad_samples"] == 3 and results["samples"] == 6
    assert "3 bad samples" in format_results(results)


# ============================================================== 7. errors as one line
def test_os_errors_name_the_path_and_the_fix():
    full = errors.describe(OSError(errno.ENOSPC, "No space left on device", "/data/x.tar"))
    assert full.startswith("/data/x.tar: No space left on device") and "free space" in full
    denied = errors.describe(PermissionError(errno.EACCES, "Permission denied", "/etc/x"))
    assert denied.startswith("/etc/x:") and "permission" in denied.lower()
    assert errors.describe(KeyError("bug")) is None  # bugs keep their traceback


def test_write_errors_name_the_file_being_written(tmp_path, monkeypatch):
    real_fsync = os.fsync

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError) as error:
        storage.write_bytes_atomic(str(tmp_path / "out.bin"), b"data")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert error.value.filename.endswith("out.bin") and error.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == []


def test_tools_print_one_line_and_debug_shows_the_traceback(tmp_path):
    url = write_set(str(tmp_path / "set"))
    manifest = json.loads((tmp_path / "set" / "manifest.json").read_text())
    manifest["shards"][0]["name"] = "../../escape.tar"
    (tmp_path / "set" / "manifest.json").write_text(json.dumps(manifest))
    result = tool("inspect_shards", url, "--out", tmp_path / "sheet.png")
    assert result.returncode == 1, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "../../escape.tar" in lines[0] and "Traceback" not in result.stderr
    debug = tool("inspect_shards", url, "--out", tmp_path / "sheet.png", "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_manifest_names_outside_the_set_are_rejected(tmp_path):
    url = write_set(str(tmp_path / "set"))
    path = tmp_path / "set" / "manifest.json"
    for name in ("../../x.tar", "/etc/passwd", "a/../../b.tar", "s3://other/x.tar"):
        manifest = json.loads(path.read_text())
        manifest["shards"][0]["name"] = name
        path.write_text(json.dumps(manifest))
        with pytest.raises(shards.ManifestError, match="leaves the set's directory"):
            shards.make_loader(url, 1)
