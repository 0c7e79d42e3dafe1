"""jobs/slurm/* on a real single-node SLURM (munged + slurmctld + slurmd on 127.0.0.1, 2 CPUs).

Shard making as an array with a task cancelled and resubmitted, training requeued by its
own warning signal and resumed, SIGTERM at a real time limit, afterok chains (complete and
broken), and 2-process DDP started by srun. `bash .ci/setup` installs slurm-wlm; without
it these tests skip (saying so); with it, a cluster that does not come up FAILS them with
the daemon logs.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import tool_command
from slurm_cluster import FINAL_STATES, SlurmCluster, missing_programs

REPO = Path(__file__).resolve().parents[1]
MAKE_SHARDS = REPO / "jobs" / "slurm" / "make_shards.sbatch"
TRAIN = REPO / "jobs" / "slurm" / "train.sbatch"
CHAIN = REPO / "jobs" / "slurm" / "chain.sh"

# Tiny CPU jobs: one CPU each, no GPUs, a little memory (the scripts' #SBATCH lines ask for
# a GPU node; command-line options override them, as on a real cluster).
CPU_JOB = ["--cpus-per-task=1", "--mem-per-cpu=1G", "--gpus-per-node=0"]
SHARD_ARGS = ["--max-skip", "5", "--clips", "180", "--clips-per-shard", "3", "--subset", "all"]
_TRAIN_SOURCE = (REPO / "tools" / "train").read_text()
# Stage 0 starts from random weights; the trainer may ask for that to be said explicitly.
FROM_SCRATCH = ["--from-scratch"] if "--from-scratch" in _TRAIN_SOURCE else []
# A run meant to be cut by its time limit streams the tiny set many times over.
ALLOW_REPEATS = ["--allow-repeats"] if "--allow-repeats" in _TRAIN_SOURCE else []
TRAIN_ARGS = ["--batch-size", "1", "--crop", "32", "--workers", "0", "--device", "cpu",
              "--deterministic", "--checkpoint-every", "100000", "--keep-last", "1", "--snapshot-every", "0",
              "--log-every", "1", "--image-every", "0", *FROM_SCRATCH]
pytestmark = pytest.mark.slow  # real SLURM daemons, shard jobs and training runs
# One thread per process everywhere: the same arithmetic in and out of SLURM.
ENV = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    missing = missing_programs()
    if missing:
        pytest.skip(f"SLURM is not installed (no {', '.join(missing)}): run `bash .ci/setup` (as root)")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """Synthetic DAVIS and static sets, and the reference shard set made by one local process."""
    root = tmp_path_factory.mktemp("slurm_data")
    for kind, size, videos in (("davis", "64x112", "3"), ("static", "64x64", "4")):
        subprocess.run(tool_command("make_synthetic", kind, root / kind, "--size", size,
                                    "--frames", "12" if kind == "davis" else "1", "--videos", videos),
                       check=True, capture_output=True, cwd=REPO)
    local = root / "local"
    subprocess.run(tool_command("make_shards", "davis", root / "davis", "--out", local, *SHARD_ARGS,
                                "--workers", "1", "--task-index", "0", "--num-tasks", "1"),
                   check=True, capture_output=True, cwd=REPO, env={**os.environ, **ENV})
    return root


def tree(root: Path) -> dict[str, str]:
    """Every file under root (relative name -> sha256)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def log_text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"({path} does not exist)"


def wait_for(ready, timeout: float, what: str, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = ready()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} within {timeout:.0f} s\n{log_text(log) if log else ''}")


def weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


# ------------------------------------------------------------------------------ shards
def test_slurm_array_shards_cancel_one_task_resubmit_it_identical_to_one_process(slurm, data, tmp_path):
    out, logs = tmp_path / "array", tmp_path / "logs"
    logs.mkdir()
    source = str(data / "davis")
    job = slurm.sbatch("--array=0-2", *CPU_JOB, f"--output={logs}/%A_%a.out", str(MAKE_SHARDS),
                       "davis", source, "--out", str(out), *SHARD_ARGS, cwd=REPO, env=ENV)
    # Task 1 owns units 1, 4, 7, ... (u % 3 == 1): cancel it once its first unit is written.
    wait_for(lambda: (out / "_parts" / "shard-000001.json").exists(), 120,
             "task 1 wrote no unit", logs / f"{job}_1.out")
    slurm.run("scancel", f"{job}_1")
    states = {r["ArrayTaskId"]: r["JobState"] for r in slurm.wait_done(job, timeout=120)}
    assert states == {"0": "COMPLETED", "1": "CANCELLED", "2": "COMPLETED"}, states
    done_by_task1 = [u for u in range(1, 60, 3) if (out / "_parts" / f"shard-{u:06d}.json").exists()]
    assert 0 < len(done_by_task1) < 20, f"task 1 was not cancelled mid-run: {len(done_by_task1)} of 20 units"
    assert not (out / "manifest.json").exists()  # the set is incomplete, nobody may claim it done

    # Resubmit only task 1: requeued, it runs again as task 1 of 3 of the same array job
    # (so it also shares the job's lease on the set, which a new job would find held).
    slurm.run("scontrol", "requeue", f"{job}_1")
    record = slurm.wait_state(f"{job}_1", lambda r: r["JobState"] in FINAL_STATES and r["Restarts"] != "0",
                              timeout=120, log=logs / f"{job}_1.out")
    assert record["JobState"] == "COMPLETED", log_text(logs / f"{job}_1.out")
    assert "(restart 1)" in log_text(logs / f"{job}_1.out")

    local, array = tree(data / "local"), tree(out)
    assert sorted(array) == sorted(local)  # no stray (temporary, partial) files
    assert array == local  # every shard, part record and the manifest, byte for byte
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == [f"shard-{u:06d}.tar" for u in range(60)]
    assert all(array[s["name"]] == s["sha256"] for s in manifest["shards"])


# ------------------------------------------------------------------------------ training
def train_job(slurm, run_dir: Path, log: Path, shards: Path, *sbatch_args: str, iterations: int,
              extra=()) -> str:
    return slurm.sbatch(*CPU_JOB, "--ntasks-per-node=1", f"--output={log}", *sbatch_args, str(TRAIN),
                        "--stage", "3", "--shards", str(shards), "--run-dir", str(run_dir),
                        "--iterations", str(iterations), *TRAIN_ARGS, *extra, cwd=REPO, env=ENV)


#: Iterations of a run that a 1-minute time limit cuts (CPU steps take about a second).
LONG = 5000


def training_started(run_dir: Path):
    # The loop has begun (signal handlers installed) once TensorBoard has an event file.
    return list((run_dir / "tensorboard").glob("events.*"))


@pytest.fixture(scope="session")
def time_limit_job(slurm, data, tmp_path_factory):
    """A long training job that will hit a 1-minute time limit, submitted early so that it
    runs alongside the requeue test. SIGURG (ignored by default) replaces the script's
    SIGUSR1 warning, so the time limit's SIGTERM is the first signal the job sees."""
    root = tmp_path_factory.mktemp("time_limit")
    log = root / "job.out"
    job = train_job(slurm, root / "run", log, data / "local", "--time=1", "--signal=B:URG@1",
                    iterations=LONG, extra=ALLOW_REPEATS)
    return job, root / "run", log


def test_slurm_train_requeues_on_warning_signal_and_resumes_bitwise(slurm, data, tmp_path, time_limit_job):
    iterations = 8
    run_dir, log = tmp_path / "requeued", tmp_path / "requeued.out"
    job = train_job(slurm, run_dir, log, data / "local", "--time=10", iterations=iterations)
    # The reference: the same training uninterrupted, one local process, meanwhile.
    whole = subprocess.Popen(tool_command("train", "--stage", "3", "--shards", data / "local",
                                         "--run-dir", tmp_path / "whole", "--iterations", iterations,
                                         *TRAIN_ARGS),
                             cwd=REPO, env={**os.environ, **ENV},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: training_started(run_dir), 180, "training did not start", log)
        time.sleep(0.5)  # mid-run
        # What SLURM does at --signal=B:USR1@N: SIGUSR1 to the batch script only.
        slurm.run("scancel", "--signal=USR1", "--batch", job)
        record = slurm.wait_done(job, timeout=300, log=log)[0]
        output = whole.communicate(timeout=300)[0].decode(errors="replace")
    finally:
        whole.kill()
    text = log_text(log)
    assert whole.returncode == 0, output
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", (record, text)
    assert "SIGUSR1" in text and "requeueing" in text and "(restart 1)" in text, text
    assert "resumed from" in text, text
    stopped = [line for line in text.splitlines() if "signal SIGUSR1" in line]
    assert stopped, text  # the trainer checkpointed because of the signal, not at the end
    assert text.count(f"completed at iteration {iterations}") == 1, text
    assert_same_weights(run_dir / "stcn_stage3.pth", tmp_path / "whole" / "stcn_stage3.pth")
    shutil.rmtree(run_dir), shutil.rmtree(tmp_path / "whole")


def test_slurm_train_sigterm_at_time_limit_leaves_resumable_checkpoint(slurm, data, time_limit_job):
    job, run_dir, log = time_limit_job
    record = slurm.wait_done(job, timeout=200, log=log)[0]
    text = log_text(log)
    assert record["JobState"] == "TIMEOUT", (record, text)
    assert "SIGTERM" in text and "signal SIGTERM" in text, text
    checkpoints = sorted(run_dir.glob("checkpoint_*.pt"))
    assert len(checkpoints) == 1, text
    stopped_at = torch.load(checkpoints[0], map_location="cpu", weights_only=False)["iteration"]
    assert 0 < stopped_at < LONG

    # Submitting the same job again continues from that checkpoint.
    again_log = log.with_name("again.out")
    again = train_job(slurm, run_dir, again_log, data / "local", "--time=10", iterations=LONG,
                      extra=[*ALLOW_REPEATS, "--stop-after", str(stopped_at + 1)])
    record = slurm.wait_done(again, timeout=200, log=again_log)[0]
    text = log_text(again_log)
    assert record["JobState"] == "COMPLETED", text
    assert "resumed from" in text and f"stopped at iteration {stopped_at + 1}" in text, text
    shutil.rmtree(run_dir)


# ------------------------------------------------------------------------------ chains
def shard_plan(path: Path, source: Path, out: Path) -> Path:
    path.write_text("# stages tasks tools/make_shards arguments\n"
                    f"0 2 static {source} --out {out} --clips 8 --clips-per-shard 2\n")
    return path


def chain(slurm, runs: Path, plan: Path, shard_root: Path) -> subprocess.CompletedProcess:
    env = {**ENV, "SBATCH_ARGS": " ".join([*CPU_JOB, "--ntasks-per-node=1", "--time=10"]),
           "SHARDS_SBATCH_ARGS": " ".join(CPU_JOB)}
    result = slurm.run("bash", str(CHAIN), "s0", "--make-shards", str(plan), str(shard_root), str(runs),
                       "--iterations", "2", *TRAIN_ARGS, cwd=REPO, env=env, check=False)
    assert result.returncode == 0, result.stderr
    return result


def chain_jobs(runs: Path) -> list[tuple[str, str, str]]:
    return [tuple(line.split("\t")) for line in (runs / "jobs.tsv").read_text().splitlines()]


def test_slurm_chain_makes_shards_then_trains_with_afterok(slurm, data, tmp_path):
    runs, root = tmp_path / "runs", tmp_path / "shards"
    chain(slurm, runs, shard_plan(tmp_path / "plan.txt", data / "static", root / "static"), root)
    (shards_name, shards_job, _), (train_name, train_job_id, train_log) = chain_jobs(runs)
    assert shards_name.startswith("shards1") and train_name == "stage0(s0)"
    # Checked at once: the shard tasks (Python start-up alone takes a second) are not done yet.
    assert slurm.job(train_job_id)["Dependency"] == f"afterok:{shards_job}_*(unfulfilled)"
    records = slurm.wait_done(train_job_id, timeout=240, log=Path(train_log))
    assert records[0]["JobState"] == "COMPLETED", log_text(Path(train_log))
    shard_tasks = slurm.jobs(shards_job)
    assert shard_tasks and all(r["JobState"] == "COMPLETED" for r in shard_tasks)
    assert records[0]["StartTime"] >= max(r["EndTime"] for r in shard_tasks)  # afterok held it back
    assert (root / "static" / "manifest.json").is_file()
    assert (runs / "s0" / "stcn_stage0.pth").is_file()
    status = slurm.run("bash", str(CHAIN), "status", str(runs), cwd=REPO).stdout
    assert f"stage0(s0) job {train_job_id}: COMPLETED, exit 0:0; log {train_log}" in status, status
    shutil.rmtree(runs / "s0")


def test_slurm_chain_whose_shard_job_fails_never_trains_and_says_why(slurm, data, tmp_path):
    runs, root = tmp_path / "runs", tmp_path / "shards"
    missing_source = tmp_path / "no-such-data"
    chain(slurm, runs, shard_plan(tmp_path / "plan.txt", missing_source, root / "static"), root)
    (_, shards_job, shards_log), (_, train_job_id, train_log) = chain_jobs(runs)
    record = slurm.wait_state(train_job_id, lambda r: r["JobState"] in ("CANCELLED", "PENDING")
                              and r["Reason"] == "DependencyNeverSatisfied", timeout=120)
    assert record["JobState"] == "CANCELLED"
    shard_tasks = slurm.wait_done(shards_job)
    assert shard_tasks and all(r["JobState"] == "FAILED" for r in shard_tasks)
    assert not Path(train_log).exists() and not (runs / "s0").exists()  # it never ran
    status = slurm.run("bash", str(CHAIN), "status", str(runs), cwd=REPO).stdout
    # The user sees which job failed, where its log is, and why training did not run.
    for task in (0, 1):
        log = shards_log.replace("%a", str(task))
        assert f"job {shards_job}_{task}: FAILED" in status and f"log {log}" in status, status
        assert "no-such-data" in log_text(Path(log))
    assert f"job {train_job_id}: CANCELLED (DependencyNeverSatisfied)" in status, status


# ------------------------------------------------------------------------------ srun + DDP
def test_slurm_srun_two_tasks_train_one_ddp_run(slurm, data, tmp_path):
    run_dir, log = tmp_path / "ddp", tmp_path / "ddp.out"
    job = slurm.sbatch(*CPU_JOB, "--ntasks-per-node=2", "--time=10", f"--output={log}", str(TRAIN),
                       "--stage", "3", "--shards", str(data / "local"), "--run-dir", str(run_dir),
                       "--iterations", "2", *TRAIN_ARGS, cwd=REPO, env=ENV)
    record = slurm.wait_done(job, timeout=300, log=log)[0]
    text = log_text(log)
    assert record["JobState"] == "COMPLETED", text
    # Ranks from SLURM_PROCID/SLURM_NTASKS, rendezvous on the node `scontrol show hostnames` names.
    assert "rank 0 of 2 (local rank 0)" in text and "rank 1 of 2 (local rank 1)" in text, text
    assert "master localhost:" in text
    checkpoint = torch.load(run_dir / "checkpoint_000000002.pt", map_location="cpu", weights_only=False)
    assert checkpoint["world_size"] == 2 and len(checkpoint["ranks"]) == 2
    assert checkpoint["ranks"][0]["loader"] == checkpoint["ranks"][1]["loader"]
    assert (run_dir / "stcn_stage3.pth").is_file()
    shutil.rmtree(run_dir)
