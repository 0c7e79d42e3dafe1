"""The tools against a real S3 server (moto on 127.0.0.1, behind a fault-injecting proxy):
make_shards to s3:// (over faults, and two writers on one prefix), verify_shards, and
training that streams from s3:// through the node cache, with a resume, giving the very
losses of a local run; credentials stay out of every output and file."""

import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

import shards
from shards import storage

from conftest import TRAIN_SIZE as SIZE, tool_command, write_train_set
from s3_servers import (
    CREDENTIALS,
    FAST_RETRIES,
    storage_env,
    wait_for,
)
from stcn.train.stages import load_stage
from stcn.train.trainer import TrainOptions, train

pytestmark = pytest.mark.slow  # end to end on a moto server: shard jobs and training runs

REPO = Path(__file__).resolve().parents[1]
KEY_ID, SECRET = "AKIDTOOLSLEAK0002", "tools-s3cr3t-never-shown-0002"


@pytest.fixture(autouse=True)
def no_faults(proxy):
    proxy.inject(0)
    proxy.hang = None
    yield


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    from pipelines.synthetic import make_synthetic

    return make_synthetic("davis", tmp_path_factory.mktemp("raw") / "davis", videos=3, objects=2,
                          seed=4, size=(48, 64), frames=12)


def tool(name, *args, env=None, **popen):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")
                and k != storage.ENV_OPTIONS}
    full_env.update(PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.Popen(tool_command(name, *args),
                            env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def finish(process, timeout=300):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out.decode(), err.decode()


MAKE = ("davis", "--max-skip", "5", "--clips", "12", "--clips-per-shard", "4", "--subset", "all",
        "--workers", "1", "--quiet")


def shard_digests(url):
    return {s.name: s.sha256 for s in shards.read_manifest(url).shards}


def test_make_shards_to_s3_over_faults_equals_local_and_verifies(proxy, raw, tmp_path):
    from pipelines.driver import JobConfig, run_job

    local = tmp_path / "local"
    run_job(JobConfig("davis", str(raw), str(local), clips=12, clips_per_shard=4, max_skip=5,
                      subset="all"), progress=False)
    proxy.inject(4)  # every 4th request fails: 503, 500, reset, cut in turn
    start = len(proxy.log)
    code, out, err = finish(tool("make_shards", *MAKE, raw, "--out", "s3://bkt/made",
                                 env=storage_env(proxy.url)))
    assert code == 0, err
    assert proxy.faults() > 0
    assert shard_digests("s3://bkt/made") == shard_digests(str(local))
    # the manifest is the last object written: readers never see it before the shards
    puts = [path.split("?")[0] for method, path, outcome in proxy.log[start:]
            if method == "PUT" and outcome == "200" and "_lease" not in path]
    assert puts[-1] == "/bkt/made/manifest.json" and len(puts) > 3
    proxy.inject(0)
    code, out, err = finish(tool("verify_shards", "s3://bkt/made", "--no-decode",
                                 "--storage-options", json.dumps({"endpoint_url": proxy.url}),
                                 env=CREDENTIALS))
    assert code == 0 and "3 shards, 12 samples, 0 problems" in out, out + err


def test_second_writer_on_a_prefix_refuses_while_the_first_runs(proxy, raw):
    """Two jobs, one prefix: the second is refused (lease, shards.lease); the first, held
    mid-upload meanwhile, then completes a correct set."""
    release = threading.Event()
    proxy.hang = (lambda method, path: method == "PUT" and path.split("?")[0].endswith(".tar"),
                  release)
    first = tool("make_shards", *MAKE, raw, "--out", "s3://bkt/two", env=storage_env(proxy.url))
    try:
        assert wait_for(lambda: any(o == "hang" for *_, o in proxy.log), 120), "first never wrote"
        second = tool("make_shards", *MAKE, raw, "--out", "s3://bkt/two", env=storage_env(proxy.url))
        code, out, err = finish(second)
        assert code != 0 and "lease" in err.lower(), err
    finally:
        release.set()
        proxy.hang = None
    code, out, err = finish(first)
    assert code == 0, err
    code, out, err = finish(tool("verify_shards", "s3://bkt/two", env=storage_env(proxy.url)))
    assert code == 0, out + err


def test_tasks_of_one_job_write_disjoint_parts_safely(proxy, raw, tmp_path):
    """Two array tasks of one job on one prefix at once: each writes only its own units and
    part records; the set is complete, correct and merged once both are done."""
    env = {**storage_env(proxy.url), "SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_COUNT": "2"}
    tasks = [tool("make_shards", *MAKE, raw, "--out", "s3://bkt/tasks", "--task-index", i,
                  "--num-tasks", 2, env=env) for i in (0, 1)]
    results = [finish(t) for t in tasks]
    assert all(code == 0 for code, _, _ in results), results
    from pipelines.driver import JobConfig, run_job

    run_job(JobConfig("davis", str(raw), str(tmp_path / "one"), clips=12, clips_per_shard=4,
                      max_skip=5, subset="all"), progress=False)
    assert shard_digests("s3://bkt/tasks") == shard_digests(str(tmp_path / "one"))


# ------------------------------------------------------------------------------ training

ONLINE = {"hflip": {"p": 0.5, "per": "clip"}, "color_jitter_clip": {"brightness": 0.1}}


@pytest.fixture(scope="module")
def roots(proxy, tmp_path_factory):
    local = tmp_path_factory.mktemp("train") / "root"
    for source, seed in (("davis", 1), ("youtube", 2)):
        write_train_set(str(local / source / "skip5"), source, 8, seed, ONLINE, source=source)
        write_train_set(f"s3://bkt/root/{source}/skip5", source, 8, seed, ONLINE, source=source)
    return local, "s3://bkt/root"


STAGE = {"iterations": 2, "batch_size": 1, "lr": 1e-4, "phases": [{"start": 0.0, "max_skip": 5}]}


def options(run_dir, root, **changes):
    return TrainOptions(**{**dict(run_dir=str(run_dir), shards=str(root), device="cpu", workers=0,
                                  crop=SIZE, deterministic=True, checkpoint_every=100, log_every=1,
                                  image_every=0, progress=False, seed=3, allow_repeats=True),
                           **changes})


def test_training_streams_from_s3_over_faults_and_resumes_like_local(proxy, roots, tmp_path):
    local, remote = roots
    stage = load_stage(3, STAGE)
    whole = train(stage, options(tmp_path / "local", local))
    assert whole.status == "completed" and len(whole.losses) == 2
    proxy.inject(3, match=lambda method, path: "/bkt/root/" in path)
    cache = {"cache_dir": str(tmp_path / "cache"), "cache_limit": "1GB"}
    first = train(stage, options(tmp_path / "s3", remote, stop_after=1, **cache))
    assert first.status == "stopped"
    second = train(stage, options(tmp_path / "s3", remote, resume="auto", **cache))
    assert second.status == "completed"
    assert first.losses + second.losses == whole.losses  # same clips, same order
    assert proxy.faults() > 0
    retried = first.last_metrics["loader_retries"] + second.last_metrics["loader_retries"]
    assert retried > 0 and second.last_metrics["loader_cache_hits"] > 0


def test_cli_trains_from_s3_and_never_shows_credentials(proxy, roots, tmp_path):
    _, remote = roots
    config = tmp_path / "stage.yaml"
    config.write_text(json.dumps({**STAGE, "iterations": 1}))
    storage_options = json.dumps({"endpoint_url": proxy.url, "key": KEY_ID, "secret": SECRET,
                                  **FAST_RETRIES})
    common = ["--stage", "3", "--shards", remote, "--config", config, "--device", "cpu",
              "--workers", "0", "--crop", SIZE, "--allow-repeats", "--storage-options",
              storage_options, "--cache-dir", tmp_path / "cache", "--cache-limit", "100MB"]
    env = {"AWS_DEFAULT_REGION": CREDENTIALS["AWS_DEFAULT_REGION"]}
    code, out, err = finish(tool("train", *common, "--run-dir", tmp_path / "run", env=env))
    assert code == 0, err[-3000:]
    texts = [out, err] + [p.read_bytes().decode("utf-8", "replace")
                          for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert any("config.yaml" == p.name for p in (tmp_path / "run").rglob("*"))
    # a failing run (access denied) names the URL, not the credentials
    proxy.inject(1, kinds=("403",))
    code, out, err = finish(tool("train", *common, "--run-dir", tmp_path / "denied", env=env))
    assert code != 0 and "s3://bkt/root" in err and "access denied" in err, err[-3000:]
    texts += [out, err] + [p.read_bytes().decode("utf-8", "replace")
                           for p in (tmp_path / "denied").rglob("*") if p.is_file()]
    for text in texts:
        assert KEY_ID not in text and SECRET not in text


def test_make_shards_streams_bl30k_archives_from_s3(proxy, tmp_path):
    """BL30K tar archives in a bucket: listed and streamed through shards.storage (ranged
    GETs, retried), never extracted; the shards equal those made from the local archives."""
    from pipelines.driver import JobConfig, run_job
    from pipelines.synthetic import make_synthetic

    raw = make_synthetic("bl30k", tmp_path / "bl30k", videos=2, objects=2, seed=3,
                         size=(48, 64), frames=10)
    for tar in sorted((raw / "tars").glob("*.tar")):
        storage.write_bytes_atomic(f"s3://bkt/bl30k-src/{tar.name}", tar.read_bytes())
    job = {"clips_per_video": 2, "clips_per_shard": 2, "max_skip": 5}
    run_job(JobConfig("bl30k", str(raw / "tars"), str(tmp_path / "local"), **job), progress=False)
    faults = proxy.faults()
    proxy.inject(3, kinds=("reset", "503", "cut"), match=lambda method, path: "bl30k-src" in path)
    run_job(JobConfig("bl30k", "s3://bkt/bl30k-src", "s3://bkt/bl30k-out", **job), progress=False)
    assert proxy.faults() > faults
    assert shard_digests("s3://bkt/bl30k-out") == shard_digests(str(tmp_path / "local"))


def test_bench_loader_writes_a_remote_synthetic_set_and_compares_it_with_local(proxy):
    url = "s3://bkt/bench-cli"
    code, out, err = finish(tool("bench_loader", url, "--make-synthetic", "8",
                                 "--clips-per-shard", "4", "--workers", "0", "--batch-size", "4",
                                 "--repeats", "1", "-q", env=storage_env(proxy.url)))
    assert code == 0, err
    assert [s.count for s in shards.read_manifest(url).shards] == [4, 4]
    assert "8 clips" in out and "remote cold cache" in out and "remote/local" in out
