"""Pre-flight, dry run and run records of tools/train (issue: everyday use).

Tiny synthetic shard sets (tests/conftest.write_train_set); every run is CPU and a few
iterations at most.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import shards

from conftest import TRAIN_SIZE as SIZE, tool_command, write_train_set as write_set
from stcn.train.preflight import PreflightError, check_run
from stcn.train.runrecord import rank_log
from stcn.train.stages import load_stage
from stcn.train.trainer import TrainOptions, train

REPO = Path(__file__).resolve().parents[1]
ONLINE = {"hflip": {"p": 0.5, "per": "clip"}}


def run_tool(*args, timeout=120):
    return subprocess.run(tool_command("train", *args),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def skip5_root(tmp_path_factory):
    """A stage 2/3 shard root holding only the max-skip-5 sets (40 clips each)."""
    root = tmp_path_factory.mktemp("skip5")
    for seed, source in enumerate(("davis", "youtube")):
        write_set(str(root / source / "skip5"), f"{source}-", 40, seed, ONLINE, source=source, max_skip=5)
    return root


def test_stage3_with_missing_later_phase_sets_fails_fast_naming_make_shards(tmp_path, skip5_root):
    run_dir = tmp_path / "run"
    started = time.monotonic()
    result = run_tool("--stage", 3, "--shards", skip5_root, "--run-dir", run_dir, "--device", "cpu",
                      "--iterations", 100, "--batch-size", 1)
    assert time.monotonic() - started < 60
    assert result.returncode == 1, result.stdout + result.stderr
    # One message, every missing set of every later phase, each with its command.
    assert result.stderr.count("pre-flight found") == 1
    for skip in (10, 15, 20, 25):
        for source in ("davis", "youtube"):
            url = f"{skip5_root}/{source}/skip{skip}"
            assert f"{url}: missing" in result.stderr
            assert f"tools/make_shards {source} SRC --out {url} --max-skip {skip} --clips " in result.stderr
    assert f"{skip5_root}/davis/skip5" not in result.stderr  # the sets that exist are fine
    assert not run_dir.exists()  # no checkpoint, no TensorBoard files, nothing


def test_every_problem_of_every_phase_in_one_error(tmp_path):
    root = tmp_path / "shards"
    write_set(str(root / "davis/skip5"), "d5-", 40, 0, ONLINE, source="davis", max_skip=5)
    write_set(str(root / "youtube/skip5"), "y5-", 40, 1, ONLINE, source="davis", max_skip=5)  # wrong kind
    write_set(str(root / "davis/skip10"), "d10-", 40, 2, ONLINE, source="davis", max_skip=15)  # wrong skip
    write_set(str(root / "youtube/skip10"), "y10-", 40, 3, {"grayscale": {"p": 0.1}},  # other online steps
              source="youtube", max_skip=10)
    old = shards.read_manifest(str(root / "davis/skip10"))
    old.version = shards.FORMAT_VERSION - 1
    shards.write_manifest(str(root / "davis/skip15"), old)  # an older format version
    write_set(str(root / "youtube/skip15"), "y15-", 40, 4, ONLINE, source="youtube", max_skip=15)
    for seed, source in enumerate(("davis", "youtube")):  # too few clips for phase 3
        write_set(str(root / source / "skip20"), f"{source}20-", 2, seed, ONLINE, source=source, max_skip=20)
    stage = load_stage(3, {"iterations": 50, "batch_size": 2, "phases": [
        {"start": 0.0, "max_skip": 5}, {"start": 0.2, "max_skip": 10}, {"start": 0.4, "max_skip": 15},
        {"start": 0.6, "max_skip": 20}]})
    options = TrainOptions(run_dir=str(tmp_path / "run"), shards=str(root), device="cpu")
    with pytest.raises(PreflightError) as caught:
        train(stage, options)
    message = str(caught.value)
    assert f"{root}/youtube/skip5: holds source kind 'davis', stage 3 expects 'youtube'" in message
    assert f"{root}/davis/skip10: made with max skip 15, its phase needs 10" in message
    assert "phase 1: its shard sets disagree on the online augmentation" in message
    assert f"{root}/davis/skip15" in message and "version" in message
    assert "phase 3 would stream each clip ~10.00 times" in message and "--allow-repeats" in message
    assert message.count("\n  - ") == 5
    assert not (tmp_path / "run").exists()


def test_allow_repeats_accepts_short_sets_and_the_plan_says_how_often(tmp_path, skip5_root):
    stage = load_stage(3, {"iterations": 50, "batch_size": 4, "phases": [{"start": 0.0, "max_skip": 5}]})
    options = TrainOptions(run_dir=str(tmp_path / "run"), shards=str(skip5_root), device="cpu")
    strict = check_run(stage, options, world_size=1)
    assert not strict.ok and "each clip ~2.50 times" in strict.format()
    options.allow_repeats = True
    relaxed = check_run(stage, options, world_size=1)
    assert relaxed.ok and "each clip ~2.50 times" in relaxed.format()
    # More processes stream more clips: 2 x 10 iterations x 4 x 1 of 80 clips fits, x 2 does not.
    short = load_stage(3, {"iterations": 10, "batch_size": 4, "phases": [{"start": 0.0, "max_skip": 5}]})
    options.allow_repeats = False
    assert check_run(short, options, world_size=2).ok and not check_run(short, options, world_size=3).ok


def test_dry_run_prints_configuration_and_plan_and_writes_nothing(tmp_path, skip5_root):
    run_dir = tmp_path / "run"
    sets = ["--shards", f"{skip5_root}/davis/skip5", "--shards", f"{skip5_root}/youtube/skip5"]
    result = run_tool("--stage", 3, *sets, "--run-dir", run_dir, "--iterations", 20, "--batch-size", 2,
                      "--schedule-scaling", "absolute", "--dry-run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    resolved = out.split("resolved configuration (config.yaml of the run):\n")[1]
    config = yaml.safe_load(resolved.split("\nstage 3:")[0])
    assert config["options"]["keep_last"] == 3 and config["options"]["amp"] == "fp16"  # defaults included
    assert config["stage"]["schedule_scaling"] == "absolute" and config["stage"]["lr_steps"] == [125_000]
    assert "lr x0.1 at iteration 125000 (published 125000); 125000 is past the end" in out
    assert "bootstrapped CE: all pixels up to iteration 20000" in out
    assert "phase 5: iterations [18, 20) max skip 5, streams 4 clips from" in out
    assert f"{skip5_root}/davis/skip5 x1: streams 2 clips (50%), reads clips [" in out
    assert not run_dir.exists()
    # Problems make the dry run fail, listed after the plan.
    bad = run_tool("--stage", 0, "--shards", tmp_path / "nothing", "--run-dir", run_dir, "--dry-run")
    assert bad.returncode == 1 and "--from-scratch" in bad.stdout and "static: missing" in bad.stdout


@pytest.mark.slow  # a training run
def test_short_run_records_config_summary_and_rank_log(tmp_path, skip5_root):
    run_dir = tmp_path / "run"
    stage = load_stage(3, {"iterations": 3, "batch_size": 1, "phases": [{"start": 0.0, "max_skip": 5}]})
    options = TrainOptions(run_dir=str(run_dir), shards=str(skip5_root), device="cpu", workers=0,
                           crop=SIZE, log_every=2, progress=False, stop_after=2)
    first = train(stage, options)
    assert first.status == "stopped"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["iterations_done"] == 2
    assert [Path(p).name for p in summary["checkpoints"]] == ["checkpoint_000000002.pt"]

    options.stop_after = None
    result = train(stage, options)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["world_size"] == 1 and config["torch_version"].startswith("2.")
    version = next(line.split("=")[1].strip() for line in (REPO / "setup.cfg").read_text().splitlines()
                   if line.startswith("version"))
    assert config["stcn_version"] == version
    assert config["git"] is None or len(config["git"]["commit"]) == 40
    assert config["options"]["snapshot_every"] == 50_000 and config["options"]["amp"] == "fp16"
    assert config["amp"] == "off (fp32)" and config["device"] == "cpu"
    assert config["stage"]["iterations"] == 3 and config["stage"]["schedule_scaling"] == "proportional"
    assert config["start_iteration"] == 2 and config["resumed_from"].endswith("checkpoint_000000002.pt")

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == result.status == "completed"
    assert summary["iterations_done"] == 3 and summary["iterations_this_run"] == 1
    assert summary["final_loss"] == pytest.approx(result.losses[-1])
    assert summary["final_iou_frame1"] is not None and 0 <= summary["data_wait_fraction"] <= 1
    assert summary["clips_per_s"] > 0 and summary["wall_seconds"] > 0
    assert summary["weights"].endswith("stcn_stage3.pth")
    log = (run_dir / "rank0.log").read_text()
    assert log.count("--- ") == 2  # one header per start, appended
    assert "phase plan (1 process(es) x batch 1)" in log and "resumed from" in log


def test_rank_log_keeps_the_last_state_of_redrawn_lines(tmp_path, capsys):
    with rank_log(tmp_path, 3):
        sys.stderr.write("train 1%\rtrain 50%\rtrain 100%\n")
        print("plain line")
        sys.stderr.write("unfinished")
    lines = (tmp_path / "rank3.log").read_text().splitlines()
    assert lines[1:] == ["train 100%", "plain line", "unfinished"]
    assert "train 1%\r" in capsys.readouterr().err  # the console still gets everything
