"""Trainer options that decide fidelity to the published training: the ImageNet guard of
stage 0, AMP selection (fp16 + GradScaler on CUDA by default, bf16 on request, fp32 on CPU)
and how the schedule follows another iteration count. No GPU needed."""

import subprocess
from pathlib import Path

import pytest
import torch

from conftest import tool_command
from stcn.train.preflight import PreflightError, check_run
from stcn.train.stages import STAGES, describe_schedule, load_stage, resolve_stage
from stcn.train.trainer import AMP_MODES, TrainOptions, amp_policy, train

REPO = Path(__file__).resolve().parents[1]
CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


# ----------------------------------------------------------------------------- AMP
def test_amp_default_is_fp16_with_grad_scaler_on_cuda():
    assert TrainOptions(run_dir="r").amp == "fp16"
    policy = amp_policy(CUDA, TrainOptions(run_dir="r").amp)
    assert policy.dtype == torch.float16 and policy.grad_scaler


def test_amp_bf16_is_an_option_without_scaler():
    policy = amp_policy(CUDA, "bf16")
    assert policy.dtype == torch.bfloat16 and not policy.grad_scaler


@pytest.mark.parametrize("mode", AMP_MODES)
def test_cpu_runs_stay_fp32(mode):
    policy = amp_policy(CPU, mode)
    assert policy.dtype is None and not policy.grad_scaler


def test_amp_off_and_former_boolean_switch():
    assert amp_policy(CUDA, "off").dtype is None
    assert TrainOptions(run_dir="r", amp=False).amp == "off"
    assert TrainOptions(run_dir="r", amp=True).amp == "fp16"
    with pytest.raises(ValueError, match="amp must be one of"):
        TrainOptions(run_dir="r", amp="fp8")


# ----------------------------------------------------------------------------- ImageNet guard
def _problems(stage, tmp_path, **changes):
    options = TrainOptions(run_dir=str(tmp_path / "run"), shard_sets={"/nonexistent/set": 1.0}, **changes)
    return [p for p in check_run(load_stage(stage), options, 1).problems if "stage 0" in p or "FILE" in p]


def test_stage0_refuses_random_init_and_names_both_options(tmp_path):
    problems = _problems(0, tmp_path)
    assert len(problems) == 1
    assert "--imagenet-resnet50" in problems[0] and "--imagenet-resnet18" in problems[0]
    assert "--from-scratch" in problems[0]
    (tmp_path / "r50.pth").write_bytes(b"x")
    problems = _problems(0, tmp_path, imagenet_resnet50=str(tmp_path / "r50.pth"))
    assert len(problems) == 1
    assert "--imagenet-resnet18 FILE" in problems[0] and "resnet50 FILE" not in problems[0]


def test_stage0_starts_with_from_scratch_imagenet_or_stcn_weights(tmp_path):
    (tmp_path / "w.pth").write_bytes(b"x")
    weights = str(tmp_path / "w.pth")
    assert _problems(0, tmp_path, from_scratch=True) == []
    assert _problems(0, tmp_path, imagenet_resnet50=weights, imagenet_resnet18=weights) == []
    assert _problems(0, tmp_path, load_network=weights) == []
    assert _problems(3, tmp_path) == []  # stages 1-3 start from earlier stages' weights


def test_guard_fails_before_anything_is_written(tmp_path):
    options = TrainOptions(run_dir=str(tmp_path / "run"), shard_sets={"/nonexistent/set": 1.0}, device="cpu")
    with pytest.raises(PreflightError, match="--from-scratch"):
        train(load_stage(0, {"iterations": 1}), options)
    assert not (tmp_path / "run").exists()


def test_cli_stage0_without_imagenet_fails_naming_the_options(tmp_path):
    result = subprocess.run(tool_command("train", "--stage", "0", "--shards", tmp_path / "shards",
                                         "--run-dir", tmp_path / "run", "--device", "cpu"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "--imagenet-resnet50" in result.stderr and "--from-scratch" in result.stderr
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- schedules
def test_published_iterations_give_the_published_schedule():
    for number, published in STAGES.items():
        stage = resolve_stage(number, iterations=published.iterations)
        assert stage.lr_steps == published.lr_steps
        assert (stage.bootstrap_start, stage.bootstrap_end) == (20_000, 70_000)
    stage3 = resolve_stage(3)
    # Phases switch at fractions, lr steps and the bootstrap ramp are absolute iterations.
    assert [stage3.phase_start_iteration(i) for i in range(6)] == [0, 15_000, 30_000, 45_000, 60_000, 135_000]
    assert stage3.lr_steps == (125_000,)


def test_schedule_scaling_is_an_explicit_option():
    proportional = resolve_stage(3, iterations=1500)
    assert proportional.schedule_scaling == "proportional"  # the documented default
    assert proportional.lr_steps == (1250,)
    assert (proportional.bootstrap_start, proportional.bootstrap_end) == (200, 700)
    absolute = resolve_stage(3, iterations=300_000, schedule_scaling="absolute")
    assert absolute.lr_steps == (125_000,)
    assert (absolute.bootstrap_start, absolute.bootstrap_end) == (20_000, 70_000)
    # phases still switch at fractions of the run
    assert absolute.phase_start_iteration(5) == 270_000
    with pytest.raises(ValueError, match="schedule_scaling must be one of"):
        resolve_stage(3, iterations=10, schedule_scaling="sideways")


def test_explicit_milestones_are_kept_whatever_the_scaling():
    stage = load_stage(3, {"iterations": 1000, "lr_steps": [900], "bootstrap_start": 0, "bootstrap_end": 10})
    assert stage.lr_steps == (900,) and (stage.bootstrap_start, stage.bootstrap_end) == (0, 10)


def test_schedule_description_names_the_scaling_and_the_published_values():
    text = describe_schedule(resolve_stage(3, iterations=1500))
    assert "schedule scaling: proportional" in text and "1250 (published 125000)" in text
    text = describe_schedule(resolve_stage(3, iterations=1500, schedule_scaling="absolute"))
    assert "schedule scaling: absolute" in text and "125000 is past the end" in text
    assert "schedule scaling" not in describe_schedule(resolve_stage(2))  # published: nothing to say
