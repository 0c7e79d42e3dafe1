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
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import shards
from shards import errors, storage
from shards.lease import Lease, LeaseHeld

from conftest import TRAIN_SIZE as SIZE, load_tool, tool_command, write_train_set
from stcn.train.checkpoint import (
    CheckpointError,
    CheckpointManager,
    capture_rng_states,
    load_checkpoint,
    restore_rng_states,
)

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[1]
OLD_CHECKPOINT = REPO / "tests" / "data" / "checkpoint_v0_000000002.pt"
# Subprocesses compute with this process's thread count: runs compared bit for bit across
# processes must reduce in the same order.
ENV = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONPATH=str(REPO))


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


def truncate(path: Path, keep: float = 1 / 3) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def tool(name: str, *args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(tool_command(name, *args),
                          capture_output=True, text=True, env=ENV, timeout=kwargs.pop("timeout", 300),
                          **kwargs)


def run_tool_here(name: str, args: list[str], capsys) -> tuple[int, str]:
    """A tool's click command in this process (no interpreter start-up): (exit, stderr+stdout)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        load_tool(name).main(args=[str(a) for a in args], prog_name=name)
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
    from stcn.model.network import STCN
    from stcn.model.weights import CheckpointError as WeightsError, load_stcn_weights

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
    url = write_train_set(str(tmp_path / "set"), "c", 9, 0, per_shard=3)
    truncate(tmp_path / "set" / "shard-000001.tar")
    loader = shards.make_loader(url, 1, seed=0, max_bad_fraction=0.9)
    with pytest.warns(shards.BadDataWarning):
        keys = [batch["__key__"][0] for batch in loader]
    assert len(keys) == 9 and not set(keys) & {"c003-0", "c004-0", "c005-0"}  # shard 1's
    assert loader.stats.bad_samples == 3 and loader.stats.substituted == 3


@pytest.mark.parametrize("workers", [0, 2])
def test_the_loader_leaves_the_global_torch_generator_alone(tmp_path, workers):
    """The trainer checkpoints the global generator; a DataLoader iterator drawing its base
    seed from it put a resumed run one draw ahead of the uninterrupted one (each starts one
    more iterator)."""
    url = write_train_set(str(tmp_path / "set"), "c", 6, 0, per_shard=3)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    loader = shards.make_loader(url, 1, num_workers=workers, seed=1)
    keys = [batch["__key__"][0] for batch in loader]
    assert len(keys) == 6 and torch.equal(torch.get_rng_state(), before)


def test_bench_loader_reports_bad_samples_as_a_count(tmp_path):
    from shards.bench import format_results, run_benchmark

    url = write_train_set(str(tmp_path / "set"), "c", 9, 0, per_shard=3)
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
    url = write_train_set(str(tmp_path / "set"), "c", 6, 0, per_shard=3)
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
    url = write_train_set(str(tmp_path / "set"), "c", 6, 0, per_shard=3)
    path = tmp_path / "set" / "manifest.json"
    for name in ("../../x.tar", "/etc/passwd", "a/../../b.tar", "s3://other/x.tar"):
        manifest = json.loads(path.read_text())
        manifest["shards"][0]["name"] = name
        path.write_text(json.dumps(manifest))
        with pytest.raises(shards.ManifestError, match="leaves the set's directory"):
            shards.make_loader(url, 1)


# ============================================================== 2./3. training runs
ONE_PHASE = "phases:\n  - {start: 0.0, max_skip: 5}\n"
TWO_PHASES = "phases:\n  - {start: 0.0, max_skip: 5}\n  - {start: 0.5, max_skip: 10}\n"
ONLINE = {"hflip": {"p": 0.5, "per": "clip"}}


@pytest.fixture(scope="module")
def train_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    (root / "one.yaml").write_text(ONE_PHASE)
    (root / "two.yaml").write_text(TWO_PHASES)
    write_train_set(str(root / "set"), "c", 6, 0, ONLINE, per_shard=3)
    return root


def train_args(root: Path, run_dir: Path, workers: int = 0, iterations: int = 400,
               config: str = "one.yaml", *extra) -> list[str]:
    return ["--stage", "3", "--shards", str(root / "set"), "--run-dir", str(run_dir),
            "--config", str(root / config), "--iterations", str(iterations), "--batch-size", "1",
            "--crop", str(SIZE), "--workers", str(workers), "--device", "cpu", "--log-every", "1",
            "--deterministic", "--allow-repeats", "--seed", "3", *map(str, extra)]


class Output:
    """Collects a process's merged output in a thread; `wait_for(text)` polls it."""

    def __init__(self, process: subprocess.Popen):
        self.process, self.text = process, ""
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        for line in iter(self.process.stdout.readline, ""):
            self.text += line

    def wait_for(self, text: str, timeout: float = 240) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end and text not in self.text and self.process.poll() is None:
            time.sleep(0.1)
        return text in self.text

    def finish(self, timeout: float = 240) -> str:
        self.process.wait(timeout)
        self._thread.join(10)
        return self.text


def train_command(args: list[str], code: Path | None) -> tuple[list[str], dict]:
    """tools/train's command line and environment: of the repository, or of `code`, a
    snapshot of its sources."""
    command = tool_command("train", *args)
    if code is None:
        return command, ENV
    return [command[0], str(code / "tools" / "train"), *command[2:]], dict(ENV, PYTHONPATH=str(code))


def start_training(args: list[str], code: Path | None = None) -> tuple[subprocess.Popen, Output]:
    command, env = train_command(args, code)
    process = subprocess.Popen(command, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)  # its own process group, as in a shell
    return process, Output(process)


def run_training(args: list[str], code: Path | None = None) -> tuple[int, str]:
    """tools/train to the end in its own process, as start_training starts it: (exit, output)."""
    command, env = train_command(args, code)
    done = subprocess.run(command, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    return done.returncode, done.stdout


@pytest.fixture(scope="module")
def code(tmp_path_factory) -> Path:
    """A copy of the sources for runs compared bit for bit: each run is a process of its own,
    minutes apart, and an edit of the working tree in between (seen while developing: another
    memory layout in the network) changes their floats, which is no fault of the resume."""
    import shutil

    snapshot = tmp_path_factory.mktemp("code")
    for package in ("shards", "stcn", "tools"):
        shutil.copytree(REPO / package, snapshot / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    return snapshot


def state_differences(a, b, where: str = "") -> list[str]:
    """Where two checkpoint states differ: key paths of unequal tensors and values."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(map(str, a.keys() ^ b.keys()))}"]
        return [d for k in a for d in state_differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b))
                for d in state_differences(x, y, f"{where}[{i}]")]
    if torch.is_tensor(a) or torch.is_tensor(b):
        same = torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [where]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def largest_difference(a: dict, b: dict) -> float:
    """The largest absolute difference between two state dicts' floating tensors."""
    return max((float((a[k].double() - b[k].double()).abs().max()) for k in a
                if a[k].is_floating_point()), default=0.0)


def checkpoint_weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


EXIT = {"SIGINT": 130, "SIGTERM": 75, "SIGUSR1": 75}


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM", "SIGUSR1"])
@pytest.mark.slow  # trains or runs a shard job in a process
def test_signal_to_the_process_group_checkpoints_and_resumes_bitwise(train_set, code, tmp_path, name,
                                                                      workers):
    run_dir = tmp_path / "run"
    process, output = start_training(train_args(train_set, run_dir, workers), code)
    try:
        assert output.wait_for("phase 0 ["), output.text
        time.sleep(2)  # a few iterations in
        os.killpg(process.pid, getattr(signal, name))  # main process and loader workers
        text = output.finish()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == EXIT[name], text
    assert "killed by signal" not in text and "Traceback" not in text, text
    checkpoints = sorted(run_dir.glob("checkpoint_*.pt"))
    assert len(checkpoints) == 1, text
    stopped = int(checkpoints[0].stem.split("_")[1])
    assert 0 < stopped < 400
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == ("interrupted" if name == "SIGINT" else "preempted")
    # --deterministic put MKL in its reproducible mode (without it, two processes round the
    # same step differently now and then), and the run's record says so
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["mkl_reproducible"] is (True if torch.backends.mkl.is_available() else None)

    # Resume one more iteration, and run uninterrupted to it, checkpointing every iteration:
    # the checkpoint the signal wrote equals the uninterrupted run's of that iteration
    # (weights, optimizer, RNG states, loader position), and so does the next one. All runs
    # are fresh processes of the same sources: in this process, tests that ran before may
    # have left other CPU settings (thread counts), which change float results.
    exit_, text = run_training(train_args(train_set, run_dir, workers, 400, "one.yaml",
                                          "--stop-after", stopped + 1), code)
    assert exit_ == 0 and f"resumed from {checkpoints[0]}" in text, text
    exit_, text = run_training(train_args(train_set, tmp_path / "whole", workers, 400, "one.yaml",
                                          "--stop-after", stopped + 1, "--checkpoint-every", 1), code)
    assert exit_ == 0, text
    floats = []
    for iteration in (stopped, stopped + 1):
        name_ = f"checkpoint_{iteration:09d}.pt"
        split, whole = load_checkpoint(run_dir / name_), load_checkpoint(tmp_path / "whole" / name_)
        differ = state_differences(split, whole)
        # RNG states, loader position, iteration, schedule
        exact = [d for d in differ if not d.startswith(("/model/", "/optimizer/state/"))]
        assert not exact, f"iteration {iteration} (signal at {stopped}): {exact[:5]}"
        if differ:
            floats.append(f"iteration {iteration} (signal at {stopped}): {len(differ)} "
                          f"tensors, e.g. {differ[:3]}, largest weight difference "
                          f"{largest_difference(split['model'], whole['model']):.3g}")
    if floats:
        # Weights and optimizer state too, bit for bit. Before --deterministic set MKL's
        # reproducible mode, a run differed now and then (a resumed step by rounding, or a
        # whole run taking another of two trajectories). Say which kind this is: repeat the
        # uninterrupted run and compare it with itself.
        exit_, text = run_training(train_args(train_set, tmp_path / "again", workers, 400, "one.yaml",
                                              "--stop-after", stopped + 1), code)
        assert exit_ == 0, text
        name_ = f"checkpoint_{stopped + 1:09d}.pt"
        again = state_differences(load_checkpoint(tmp_path / "again" / name_),
                                  load_checkpoint(tmp_path / "whole" / name_))
        pytest.fail("float weights differ: " + "; ".join(floats)
                    + f"; a second uninterrupted run differs from the first in {len(again)} tensors")


@pytest.mark.slow  # trains or runs a shard job in a process
def test_second_ctrl_c_aborts_at_once(train_set, tmp_path):
    process, output = start_training(train_args(train_set, tmp_path / "run"))
    try:
        assert output.wait_for("phase 0 ["), output.text
        os.killpg(process.pid, signal.SIGINT)
        time.sleep(0.05)
        os.killpg(process.pid, signal.SIGINT)
        sent = time.monotonic()
        text = output.finish(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, text
    assert "Aborted" in text and time.monotonic() - sent < 30, text
    assert not list((tmp_path / "run").glob(".checkpoint_*.tmp-*")), "a half-written checkpoint was left"


@pytest.mark.slow  # trains or runs a shard job in a process
def test_kill_9_during_a_checkpoint_write_keeps_the_previous_one(train_set, tmp_path):
    """kill -9 while a checkpoint is being written (its temporary file exists, hundreds of MB):
    the checkpoints before it stay whole, and the next start removes the temporary file with
    a log line and resumes from the newest whole checkpoint."""
    run_dir = tmp_path / "run"
    process, output = start_training(train_args(train_set, run_dir, 0, 400, "one.yaml",
                                                "--checkpoint-every", 1))
    temps: list[Path] = []
    try:
        deadline = time.monotonic() + 300
        while not temps and time.monotonic() < deadline and process.poll() is None:
            if list(run_dir.glob("checkpoint_*.pt")):  # one whole checkpoint, the next being written
                temps = list(run_dir.glob(".checkpoint_*.pt.tmp-*"))
            time.sleep(0.002)
        os.killpg(process.pid, signal.SIGKILL)
        text = output.finish()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL, text
    assert temps and temps[0].exists(), f"the kill missed the write: {text}"
    whole = sorted(run_dir.glob("checkpoint_*.pt"))
    newest = int(whole[-1].stem.split("_")[1])
    assert f"checkpoint_{newest + 1:09d}.pt" in temps[0].name  # the one being written
    for path in whole:
        assert load_checkpoint(path)["iteration"] == int(path.stem.split("_")[1])

    code, text = run_training(train_args(train_set, run_dir, 0, 400, "one.yaml",
                                         "--checkpoint-every", 1, "--stop-after", newest + 1))
    assert code == 0, text
    assert f"removed {temps[0]}" in text and "left by a save that was killed" in text, text
    assert f"resumed from {whole[-1]} at iteration {newest}" in text, text
    assert not list(run_dir.glob(".checkpoint_*.tmp-*"))
    assert load_checkpoint(run_dir / f"checkpoint_{newest + 1:09d}.pt")["iteration"] == newest + 1


@pytest.mark.slow  # trains or runs a shard job in a process
def test_huge_lr_diverges_exits_nonzero_and_exports_nothing(train_set, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, text = run_tool_here("train", train_args(train_set, run_dir, 0, 8, "one.yaml", "--lr", "1e6",
                                                   "--max-nonfinite", "2"), capsys)
    assert code == 1, text
    assert "diverged" in text and len(error_lines(text)) == 1
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "diverged"
    assert not list(run_dir.glob("*.pth")), "weights exported from a diverged run"
    for path in run_dir.glob("checkpoint_*.pt"):
        assert all(torch.isfinite(t).all() for t in checkpoint_weights(path).values()
                   if t.is_floating_point())


@pytest.mark.slow  # trains or runs a shard job in a process
def test_divergence_never_replaces_the_last_good_checkpoint(train_set, tmp_path, monkeypatch):
    """Losses turn NaN after 2 good steps: the checkpoint due at 4 is not written, the run
    stops as diverged after --max-nonfinite, checkpoint 2 (keep_last 1) survives."""
    from stcn.train import trainer as trainer_module
    from stcn.train.stages import resolve_stage
    from stcn.train.trainer import TrainOptions, train

    real = trainer_module.bootstrapped_cross_entropy
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) > 4 else loss  # 2 frames per step

    monkeypatch.setattr(trainer_module, "bootstrapped_cross_entropy", poisoned)
    stage = resolve_stage(3, str(train_set / "one.yaml"), iterations=20, batch_size=1)
    result = train(stage, TrainOptions(run_dir=str(tmp_path / "run"),
                                       shard_sets={str(train_set / "set"): 1.0},
                                       device="cpu", workers=0, crop=SIZE, checkpoint_every=2, keep_last=1,
                                       max_nonfinite=3, allow_repeats=True, seed=3, log_every=1))
    assert result.status == "diverged" and result.weights_path is None
    assert result.iteration == 6  # 2 good steps, then 4 non-finite ones (more than 3)
    assert [p.name for p in sorted((tmp_path / "run").glob("checkpoint_*.pt"))] == ["checkpoint_000000002.pt"]


@pytest.mark.slow  # trains or runs a shard job in a process
def test_bad_sample_count_accumulates_over_phases_and_resumes(train_set, tmp_path, capsys):
    """One damaged clip in each of 2 shards of 24, two phases of 3 batches of 8 reading
    disjoint ranges of the set (one shard each; the loader tolerates 5%): the logged count
    carries over from phase 0 into phase 1 and across a resume."""
    root = tmp_path
    (root / "two.yaml").write_text(TWO_PHASES)
    url = write_train_set(str(root / "set"), "c", 48, 0, ONLINE, per_shard=24)
    # corrupt the JPEG of one sample in each shard (sha256 recomputed: only decoding fails)
    from shards.reader import iter_shard
    from shards.writer import write_encoded_shard
    manifest = shards.read_manifest(url)
    infos = []
    for info in manifest.shards:
        samples = list(iter_shard(f"{url}/{info.name}", info, verify=True))
        samples[0] = {**samples[0], "frames.jpg": samples[0]["frames.jpg"][:200]}
        infos.append(write_encoded_shard(f"{url}/{info.name}", samples))
    shards.write_manifest(url, shards.Manifest(shards=infos, config=manifest.config))

    def metrics(run_dir, *extra):
        code, text = run_tool_here("train", train_args(root, run_dir, 0, 6, "two.yaml",
                                                       "--batch-size", 8, *extra), capsys)
        assert code == 0, text
        return json.loads((run_dir / "summary.json").read_text())

    whole = metrics(root / "whole")
    assert whole["status"] == "completed"
    # phase 0 streams clips [0, 24) (shard 0), phase 1 clips [24, 48) (shard 1): one bad each
    assert whole["bad_samples"] == 2, whole
    metrics(root / "split", "--stop-after", 4)  # stops inside phase 1
    split = metrics(root / "split")
    assert split["bad_samples"] == whole["bad_samples"]


# ============================================================== 6. one job per shard set
@pytest.fixture(scope="module")
def davis(tmp_path_factory):
    from pipelines.synthetic import make_synthetic

    return make_synthetic("davis", tmp_path_factory.mktemp("raw") / "davis", videos=3, objects=2,
                          seed=2, size=(72, 96), frames=12)


def make_shards_args(source: Path, out: Path, clips: int = 12, workers: int = 1) -> list[str]:
    return ["davis", str(source), "--out", str(out), "--max-skip", "5", "--clips", str(clips),
            "--clips-per-shard", "2", "--subset", "all", "--workers", str(workers), "--quiet"]


def set_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))} | \
        {"manifest.json": (out / "manifest.json").read_bytes()}


@pytest.mark.slow  # trains or runs a shard job in a process
def test_second_job_on_a_set_refuses_and_a_killed_holder_is_taken_over(davis, tmp_path):
    out = tmp_path / "set"
    first = subprocess.Popen(tool_command("make_shards", *make_shards_args(davis, out, clips=400)), env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("_parts/*.json")) and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert (out / "_lease.json").exists() and first.poll() is None
        second = tool("make_shards", *make_shards_args(davis, out, clips=400))
        assert second.returncode == 1
        lines = error_lines(second.stderr)
        assert len(lines) == 1, second.stderr
        assert f"pid {first.pid}" in lines[0] and "being written by" in lines[0], second.stderr
        os.killpg(first.pid, signal.SIGKILL)  # kill -9, pool workers included
        first.wait()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert not (out / "manifest.json").exists()
    # a dead holder's lease is taken over with a warning; the result equals a clean run
    rerun = tool("make_shards", *make_shards_args(davis, out, clips=400))
    assert rerun.returncode == 0, rerun.stderr
    assert "taking over the stale lease" in rerun.stderr and f"pid {first.pid}" in rerun.stderr
    clean = tool("make_shards", *make_shards_args(davis, tmp_path / "clean", clips=400))
    assert clean.returncode == 0, clean.stderr
    assert set_bytes(out) == set_bytes(tmp_path / "clean")
    assert not (out / "_lease.json").exists() and not list(out.rglob(".*"))


def test_array_tasks_share_the_lease_and_clean_only_dead_owners_temps(davis, tmp_path, monkeypatch):
    from pipelines.driver import JobConfig, Task, run_job

    out = tmp_path / "set"
    out.mkdir()
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4242")
    task0 = Lease(str(out)).acquire()  # task 0 of the array, still writing shard 0
    live = out / f".shard-000000.tar.tmp-{'0' * 32}"
    dead = out / f".shard-000001.tar.tmp-{'1' * 32}"  # an earlier, killed attempt of task 1
    live.write_bytes(b"in flight")
    dead.write_bytes(b"left behind")
    job = JobConfig("davis", str(davis), str(out), clips=4, clips_per_shard=2, max_skip=5, subset="all")
    try:
        run_job(job, task=Task(1, 2), progress=False)  # task 1 joins its job's lease
        assert live.exists(), "a live task's temporary file was deleted"
        assert not dead.exists()
        assert (out / "shard-000001.tar").exists()
        monkeypatch.delenv("SLURM_ARRAY_JOB_ID")
        with pytest.raises(LeaseHeld, match="job slurm-4242"):
            run_job(job, task=Task(0, 2), progress=False)  # another job: refused
    finally:
        task0.release()
    assert (out / "_lease.json").exists(), "the array's lease stays until the set is complete"


def test_stale_lease_of_a_dead_process_is_taken_over_with_a_warning(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "set"
    out.mkdir()
    holder = {"job": f"host:{dead.pid}", "shared": False, "host": __import__("socket").gethostname(),
              "pid": dead.pid, "pid_start": None, "started": time.time(), "heartbeat": time.time(),
              "token": "x"}
    (out / "_lease.json").write_text(json.dumps(holder))
    with pytest.warns(UserWarning, match=f"taking over the stale lease .*pid {dead.pid}"):
        lease = Lease(str(out), env={}).acquire()
    assert lease.read().pid == os.getpid()
    lease.release()
    assert not (out / "_lease.json").exists()
    # a live holder elsewhere with a fresh heartbeat is not stale; an old heartbeat is
    holder.update(host="elsewhere", pid=1, heartbeat=time.time())
    (out / "_lease.json").write_text(json.dumps(holder))
    with pytest.raises(LeaseHeld, match="host elsewhere, pid 1"):
        Lease(str(out), env={}).acquire()
    holder.update(heartbeat=time.time() - 3600)
    (out / "_lease.json").write_text(json.dumps(holder))
    with pytest.warns(UserWarning, match="stale lease"):
        Lease(str(out), env={}).acquire().release()


def test_lease_on_s3_refuses_shares_and_takes_over(tmp_path):
    pytest.importorskip("moto")
    pytest.importorskip("s3fs")
    from s3_servers import make_bucket, moto_server, storage_configured

    with moto_server() as endpoint, storage_configured(endpoint):
        out = make_bucket("leases") + "/davis/skip5"
        first = Lease(out, env={}, heartbeat_s=0.2).acquire()
        with pytest.raises(LeaseHeld, match=f"pid {os.getpid()}"):
            Lease(out, env={"SLURM_JOB_ID": "7"}).acquire()
        beat = first.read().heartbeat
        time.sleep(0.6)
        assert first.read().heartbeat > beat  # the heartbeat thread renews it
        first.release()
        assert first.read() is None
        tasks = [Lease(out, env={"SLURM_ARRAY_JOB_ID": "9"}).acquire() for _ in range(2)]
        assert tasks[1].read().job == "slurm-9"
        for task in tasks:
            task.release()
        assert tasks[0].read() is not None  # set not complete: other tasks may still run
        with pytest.warns(UserWarning, match="taking over the stale lease .*slurm-9"):
            Lease(out, env={}, stale_after_s=0.0).acquire().release()


# ============================================================== 7. disk full, bad inputs
@pytest.fixture
def tiny_tmpfs(tmp_path):
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'not permitted'})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_names_the_path_and_a_rerun_after_freeing_space_completes(davis, tmp_path, tiny_tmpfs):
    out = tiny_tmpfs / "set"
    full = tool("make_shards", *make_shards_args(davis, out, clips=40))
    assert full.returncode == 1
    lines = error_lines(full.stderr)
    assert len(lines) == 1, full.stderr
    assert str(out) in lines[0] and "No space left on device; free space" in lines[0], full.stderr
    assert "Traceback" not in full.stderr
    subprocess.run(["mount", "-o", "remount,size=64m", str(tiny_tmpfs)], check=True)
    rerun = tool("make_shards", *make_shards_args(davis, out, clips=40))
    assert rerun.returncode == 0, rerun.stderr
    clean = tool("make_shards", *make_shards_args(davis, tmp_path / "clean", clips=40))
    assert clean.returncode == 0
    assert set_bytes(out) == set_bytes(tmp_path / "clean")


def test_checkpoint_on_a_full_disk_names_the_file(tiny_tmpfs):
    manager = CheckpointManager(tiny_tmpfs)
    with pytest.raises(OSError) as error:
        manager.save({"iteration": 1, "model": {"w": torch.zeros(1 << 20)}}, 1)  # 4 MB
    assert error.value.errno == errno.ENOSPC and error.value.filename.endswith("checkpoint_000000001.pt")
    assert "checkpoint_000000001.pt: No space left on device" in errors.describe(error.value)
    assert os.listdir(tiny_tmpfs) == []


def copy_tree(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def test_mask_size_mismatch_names_the_video_and_both_files(davis, tmp_path):
    from PIL import Image

    source = copy_tree(davis, tmp_path / "davis")
    mask = sorted(source.rglob("trainval/Annotations/480p/*/00000.png"))[0]
    Image.open(mask).resize((50, 40), Image.NEAREST).save(mask)  # keeps the palette
    # clip 0 of every video reads frame 00000 at some point: make every video's first mask bad
    for other in sorted(source.rglob("trainval/Annotations/480p/*/00000.png"))[1:]:
        other.write_bytes(mask.read_bytes())
    result = tool("make_shards", *make_shards_args(source, tmp_path / "set", clips=6))
    assert result.returncode == 1
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert "00000.png is 50x40" in lines[0] and ".jpg is 96x72" in lines[0] and "davis video" in lines[0]


def test_too_short_listed_videos_are_warned_about_and_counted(davis, tmp_path):
    source = copy_tree(davis, tmp_path / "davis")
    listed = next(source.rglob("ImageSets/2017/train.txt")).read_text().split()
    video = next(source.rglob(f"trainval/JPEGImages/480p/{listed[0]}"))
    for path in sorted(video.glob("*.jpg"))[2:]:
        path.unlink()
        Path(str(path).replace("/JPEGImages/", "/Annotations/")).with_suffix(".png").unlink()
    result = tool("make_shards", *make_shards_args(source, tmp_path / "set", clips=6))
    assert result.returncode == 0, result.stderr
    assert "1 listed video(s)" in result.stderr and video.name in result.stderr
    config = shards.read_manifest(str(tmp_path / "set")).config
    assert config["too_short_videos"] == [video.name] and config["videos"] == 2


# ============================================================== holds today
def test_corrupt_and_truncated_shards_are_named_by_verify_shards(tmp_path):
    url = write_train_set(str(tmp_path / "set"), "c", 9, 0, per_shard=3)
    truncate(tmp_path / "set" / "shard-000001.tar", 0.5)
    data = bytearray((tmp_path / "set" / "shard-000002.tar").read_bytes())
    data[700] ^= 0xFF
    (tmp_path / "set" / "shard-000002.tar").write_bytes(bytes(data))
    result = tool("verify_shards", url)
    assert result.returncode != 0
    assert "shard-000001.tar" in result.stdout + result.stderr
    assert "shard-000002.tar" in result.stdout + result.stderr
