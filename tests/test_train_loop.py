"""The training loop end to end on tiny synthetic shard sets (CPU, 32x32 clips).

Exact resume, phase switching, preemption signals, NaN policy, weight export and the
stage-0 -> stage-3 hand-over, TensorBoard output.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import shards
from shards.sample_clips import make_clip

from conftest import TRAIN_SIZE as SIZE, tool_command, tool_path, write_train_set as write_set
from stcn.model.network import STCN
from stcn.model.weights import load_stcn_weights
from stcn.train import trainer as trainer_module
from stcn.train.stages import load_stage
from stcn.train.trainer import NonFiniteLossError, TrainOptions, train

pytestmark = pytest.mark.slow  # every test here trains (DDP, signals, resume, chains)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    online = {"hflip": {"p": 0.5, "per": "clip"}, "color_jitter_clip": {"brightness": 0.1}}
    write_set(str(root / "static"), "img", 12, 0, source="static", max_skip=0)
    for source, seed in (("davis", 1), ("youtube", 2)):
        # every skip of the curriculum: the pre-flight checks the sets of all phases at start
        for skip in (5, 10, 15, 20, 25):
            write_set(str(root / source / f"skip{skip}"), f"{source}{skip}-", 10, seed + skip, online,
                      source=source, max_skip=skip)
    return root


def two_phase_stage(stage: int, iterations: int, **fields):
    """A short stage whose curriculum moves from skip 5 to skip 10 at 3/4 of the run."""
    override = {"iterations": iterations, "batch_size": 1, "lr": 1e-4,
                "phases": [{"start": 0.0, "max_skip": 5}, {"start": 0.75, "max_skip": 10}]}
    if stage == 0:
        override["phases"] = [{"start": 0.0, "max_skip": None}]
    override.update(fields)
    return load_stage(stage, override)


def options(run_dir, root, **changes):
    base = dict(run_dir=str(run_dir), shards=str(root), device="cpu", workers=0, crop=SIZE,
                crop_mode="random", deterministic=True, checkpoint_every=100, log_every=1,
                image_every=2, progress=False, seed=3)
    base.update(changes)
    return TrainOptions(**base)


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("workers, iterations", [(0, 4), (2, 2)])
def test_split_run_with_resume_matches_one_run_bitwise(tmp_path, shard_root, workers, iterations):
    stage = two_phase_stage(3, iterations=iterations)
    whole = train(stage, options(tmp_path / "whole", shard_root, workers=workers))
    assert whole.status == "completed" and len(whole.losses) == iterations

    half = iterations // 2
    first = train(stage, options(tmp_path / "split", shard_root, workers=workers, stop_after=half))
    assert first.status == "stopped" and first.iteration == half
    second = train(stage, options(tmp_path / "split", shard_root, workers=workers, resume="auto"))
    assert second.status == "completed" and second.iteration == iterations

    assert first.losses + second.losses == whole.losses
    a, b = weights(whole.weights_path), weights(second.weights_path)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    last = f"checkpoint_{iterations:09d}.pt"
    whole_ckpt = torch.load(tmp_path / "whole" / last, weights_only=False)
    split_ckpt = torch.load(tmp_path / "split" / last, weights_only=False)
    assert whole_ckpt["ranks"][0]["loader"] == split_ckpt["ranks"][0]["loader"]
    if iterations == 4:
        assert whole_ckpt["ranks"][0]["loader"]["phase"] == 1  # the curriculum moved to skip 10

    # A finished run resumed again does nothing but re-export its weights.
    again = train(stage, options(tmp_path / "split", shard_root, workers=workers))
    assert again.status == "completed" and again.iteration == iterations and again.losses == []


def test_tensorboard_scalars_and_images(tmp_path, shard_root):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(two_phase_stage(3, iterations=1),
          options(tmp_path / "tb", shard_root, image_every=1, channels_last=True))
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for name in ("loss_frame1", "loss_frame2", "iou_frame1", "iou_frame2", "lr", "bootstrap_fraction",
                 "clips_per_s", "data_wait_fraction", "gpu_memory_gib"):
        assert f"train/{name}" in scalars
    assert [e.step for e in events.Scalars("train/loss")] == [1]
    assert "train/frames_gt_prediction" in events.Tags()["images"]


def test_stage0_weights_export_and_widen_into_stage3(tmp_path, shard_root):
    result = train(two_phase_stage(0, iterations=1), options(tmp_path / "s0", shard_root, from_scratch=True))
    exported = weights(result.weights_path)
    assert result.weights_path.name == "stcn_stage0.pth"
    assert list(exported) == list(STCN(single_object=True).state_dict())
    assert exported["value_encoder.conv1.weight"].shape[1] == 4

    s03 = train(two_phase_stage(3, iterations=1),
                options(tmp_path / "s03", shard_root, load_network=str(result.weights_path)))
    widened = weights(s03.weights_path)["value_encoder.conv1.weight"]
    assert widened.shape[1] == 5
    load_stcn_weights(STCN(single_object=False), s03.weights_path)
    with pytest.raises(ValueError, match="is for stage 3, not 2"):
        train(two_phase_stage(2, iterations=1), options(tmp_path / "s03", shard_root))


class _PoisonFirstLoss:
    """Makes the first loss of the run NaN (stands in for a numerically bad batch)."""

    def __init__(self):
        self.calls = 0
        self.real = trainer_module.bootstrapped_cross_entropy

    def __call__(self, *args, **kwargs):
        self.calls += 1
        loss = self.real(*args, **kwargs)
        return loss * float("nan") if self.calls == 1 else loss


def test_nan_policy_skip_reports_and_continues(tmp_path, shard_root, monkeypatch, capsys):
    monkeypatch.setattr(trainer_module, "bootstrapped_cross_entropy", _PoisonFirstLoss())
    result = train(two_phase_stage(3, iterations=2), options(tmp_path / "nan", shard_root))
    out = capsys.readouterr().out
    assert "non-finite loss at iteration 0" in out and "-0" in out  # sample keys end in -0
    assert result.status == "completed" and len(result.losses) == 1
    assert result.last_metrics["nonfinite_steps"] == 1


def test_nan_policy_stop_raises_with_sample_keys(tmp_path, shard_root, monkeypatch):
    monkeypatch.setattr(trainer_module, "bootstrapped_cross_entropy", _PoisonFirstLoss())
    with pytest.raises(NonFiniteLossError, match=r"iteration 0 .*samples: \w"):
        train(two_phase_stage(3, iterations=2), options(tmp_path / "nan", shard_root, nan_policy="stop"))
    assert not list((tmp_path / "nan").glob("checkpoint_*.pt"))


def test_cli_checkpoints_and_exits_75_on_sigterm_then_resumes(tmp_path, shard_root):
    run_dir = tmp_path / "cli"
    command = tool_command("train", "--stage", "3", "--shards", shard_root, "--run-dir", run_dir,
                           "--iterations", "400", "--batch-size", "1", "--crop", SIZE, "--workers", "0",
                           "--device", "cpu", "--no-progress", "--log-every", "1", "--allow-repeats")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        # Wait until training runs (TensorBoard gets its first scalars after iteration 1).
        deadline = time.time() + 120
        while time.time() < deadline and not list((run_dir / "tensorboard").glob("events.*")):
            time.sleep(0.2)
        time.sleep(3)
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=120)[0].decode()
    finally:
        process.kill()
    assert process.returncode == 75, output
    checkpoints = sorted(run_dir.glob("checkpoint_*.pt"))
    assert len(checkpoints) == 1 and "signal SIGTERM" in output
    stopped_at = torch.load(checkpoints[0], weights_only=False)["iteration"]
    assert 0 < stopped_at < 400
    summary = json.loads((run_dir / "summary.json").read_text())  # written on preemption too
    assert summary["status"] == "preempted" and summary["iterations_done"] == stopped_at

    resumed = subprocess.run(command + ["--stop-after", str(stopped_at + 1)], env=env,
                             capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr + resumed.stdout
    assert f"stopped at iteration {stopped_at + 1}" in resumed.stderr


def test_cli_help_explains_every_option():
    result = subprocess.run(tool_command("train", "--help"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for option in ("--stage", "--shards", "--run-dir", "--load-network", "--resume", "--iterations",
                   "--batch-size", "--lr", "--crop", "--workers", "--config", "--amp", "--device",
                   "--nan-policy", "--compile", "--channels-last", "--from-scratch", "--schedule-scaling",
                   "--dry-run", "--allow-repeats", "--rank-logs"):
        assert option in result.stdout


def test_two_process_gloo_run_and_elastic_resume_in_one_process(tmp_path, shard_root):
    run_dir = tmp_path / "ddp"
    # explicit sets, read by every phase: each phase reads its own range of them, and no
    # clip may be streamed twice, also after the elastic resume (no --allow-repeats)
    sets = ["--shards", f"{shard_root}/davis/skip5=1", "--shards", f"{shard_root}/youtube/skip5"]
    common = ["--stage", "3", *sets, "--run-dir", str(run_dir), "--iterations", "3",
              "--batch-size", "1", "--crop", str(SIZE), "--workers", "0", "--device", "cpu",
              "--no-progress", "--log-every", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2",
                          tool_path("train"), *common, "--stop-after", "2"],
                         env=env, capture_output=True, text=True, timeout=400)
    assert two.returncode == 0, two.stdout + two.stderr
    checkpoint = torch.load(run_dir / "checkpoint_000000002.pt", weights_only=False)
    assert checkpoint["world_size"] == 2 and len(checkpoint["ranks"]) == 2
    # Both ranks read the same epoch plan and delivered the same number of batches.
    assert checkpoint["ranks"][0]["loader"] == checkpoint["ranks"][1]["loader"]
    # Each process keeps its console output in the run directory (batch jobs have no terminal).
    assert "phase plan (2 process(es) x batch 1)" in (run_dir / "rank0.log").read_text()
    assert " rank 1: " in (run_dir / "rank1.log").read_text().splitlines()[0]

    one = subprocess.run(tool_command("train", *common), env=env,
                         capture_output=True, text=True, timeout=400)
    assert one.returncode == 0, one.stdout + one.stderr
    assert "resuming a 2-process checkpoint with 1 processes" in one.stderr
    assert "completed at iteration 3" in one.stderr
    # phase 4, iterations [1, 3), reads clips [3, 10) of both sets: 2 streamed on 2 GPUs
    assert "phase 4 [2, 3) streams 1 clips (+2 streamed before) from 14 (each clip once)" \
        in one.stdout + one.stderr
    load_stcn_weights(STCN(single_object=False), run_dir / "stcn_stage3.pth")


def test_local_chain_runs_stage0_then_stage3_from_its_weights(tmp_path, shard_root):
    runs = tmp_path / "runs"
    command = ["bash", str(REPO / "jobs" / "local" / "chain.sh"), "s03", str(shard_root), str(runs),
               "--iterations", "1", "--batch-size", "1", "--crop", str(SIZE), "--workers", "0",
               "--device", "cpu", "--no-progress", "--from-scratch"]
    env = dict(os.environ, OMP_NUM_THREADS="1", GPUS="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (runs / "s0" / "stcn_stage0.pth").is_file() and (runs / "s03" / "stcn_stage3.pth").is_file()
    assert not (runs / "s01").exists()
    # Stage 3 started from stage 0's weights (widened): one Adam step away from them.
    s0, s3 = weights(runs / "s0" / "stcn_stage0.pth"), weights(runs / "s03" / "stcn_stage3.pth")
    name = "value_encoder.conv1.weight"
    assert (s0[name] - s3[name][:, :4]).abs().max() < 1e-3
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stderr.count("already done") == 2


def test_mostly_empty_clips_warn_with_their_share(tmp_path):
    """3 of 4 clips without any object: training warns with the share, summary.json records it."""
    rng = np.random.default_rng(0)
    samples = [make_clip(rng, f"e{i:03d}-0", size=SIZE, n_objects=1 if i % 4 == 0 else 0) for i in range(16)]
    url = str(tmp_path / "mostly_empty")
    shard = shards.write_shard(f"{url}/shard-000000.tar", samples)
    shards.write_manifest(url, shards.Manifest(
        shards=[shard], config={"kind": "synthetic", "source": "davis", "max_skip": 5}))
    stage = load_stage(3, {"iterations": 8, "batch_size": 2, "lr": 1e-4,
                           "phases": [{"start": 0.0, "max_skip": 5, "sets": {url: 1.0}}]})
    with pytest.warns(UserWarning,
                      match=r"75% of the clips stage 3 streamed so far \(12 of 16\) have no target"):
        train(stage, options(tmp_path / "run", None, log_every=4, image_every=0))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["clips_seen"] == 16 and summary["clips_without_target_share"] == 0.75


def test_clips_with_targets_do_not_warn(tmp_path, shard_root, recwarn):
    train(two_phase_stage(3, iterations=4), options(tmp_path / "run", shard_root, log_every=4, image_every=0))
    assert not [w for w in recwarn if "no target object" in str(w.message)]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["clips_without_target_share"] == 0.0
