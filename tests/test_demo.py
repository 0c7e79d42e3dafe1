"""The demo (jobs/local/demo.sh) in miniature: every real tool, from synthetic data to scores."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_demo(out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEMO_SCALE="mini", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    return subprocess.run(["bash", str(REPO / "jobs/local/demo.sh"), str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = run_demo(out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout


def test_demo_runs_every_step_and_prints_the_summary(demo):
    out, stdout = demo
    for step, name in enumerate(["generate synthetic sets", "make shards", "train stage 0",
                                 "train stage 3", "evaluate untrained network",
                                 "evaluate trained network", "copy-first-frame baseline"], start=1):
        assert re.search(rf"\[{step}/7\] {name}.*elapsed \d+:\d\d, about \d+:\d\d left", stdout), name
    # What each real tool left behind.
    assert (out / "data/davis/2017/trainval/ImageSets/2017/val.txt").is_file()
    for shard_set in ["static", "davis/skip5", "youtube/skip25"]:
        assert (out / "shards" / shard_set / "manifest.json").is_file(), shard_set
    assert (out / "runs/s0/stcn_stage0.pth").is_file()
    assert (out / "runs/s03/stcn_stage3.pth").is_file()
    assert list((out / "runs/s03/tensorboard").rglob("events.out.tfevents.*"))
    # The printed J&F figures are the ones the evaluations saved.
    for label, name in [("trained", "trained"), ("untrained", "untrained"), ("copy the first-frame mask", "copy_first_frame")]:
        saved = json.loads((out / "eval" / name / "results.json").read_text())["scores"]["J&F"]
        printed = re.search(rf"{re.escape(label)}.*?\s(-?\d+\.\d)\n", stdout).group(1)
        assert abs(float(printed) - saved) < 0.051, (label, printed, saved)
    assert "tensorboard --logdir" in stdout
    assert re.search(r"inference speed \(trained\):\s+\d+\.\d FPS", stdout)


def test_copy_first_frame_baseline_scores_the_copied_masks(demo):
    from stcn.evaluation import copy_first_frame_baseline

    out, _ = demo
    saved = json.loads((out / "eval/copy_first_frame/results.json").read_text())["scores"]
    assert saved["J&F"] == pytest.approx(copy_first_frame_baseline(out / "data/davis", "val")["J&F"])
    first = sorted((out / "data/davis/2017/trainval/Annotations/480p").glob("val-*/00000.png"))[0]
    copied = sorted((out / "eval/copy_first_frame" / first.parent.name).glob("*.png"))
    assert len(copied) > 1 and all(p.read_bytes() == copied[0].read_bytes() for p in copied)


def test_demo_rerun_reuses_finished_steps(demo):
    out, _ = demo
    result = run_demo(out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "already generated" in result.stdout
    assert "already made" in result.stdout
    assert "stage 0 already trained" in result.stdout and "stage 3 already trained" in result.stdout
