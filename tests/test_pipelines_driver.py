"""The shard job end to end on synthetic sets: contents, determinism, task split, resume."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import shards

from conftest import tool_command
from pipelines.driver import JobConfig, JobError, Task, merge, run_job
from pipelines.synthetic import make_synthetic

REPO = Path(__file__).resolve().parents[1]
#: the synthetic sets do not hold the videos of the published train lists
ALL = {"davis": {"subset": "all"}, "youtube": {"subset": "all"}}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    sets = {kind: make_synthetic(kind, root / kind, videos=3, objects=3, seed=2, size=(72, 96),
                                 **({} if kind == "static" else {"frames": 40}))
            for kind in ("davis", "youtube", "bl30k", "static")}
    sets["static"] = make_synthetic("static", root / "static", videos=2, seed=2, size=(72, 96),
                                    overwrite=True)
    return sets


def _samples(out):
    return {s["__key__"]: s for s in shards.iter_samples(str(out))}


def _bytes(out):
    return {p.name: p.read_bytes() for p in sorted(Path(out).glob("*.tar"))} | \
        {"manifest.json": (Path(out) / "manifest.json").read_bytes()}


@pytest.mark.parametrize("kind,max_skip", [("davis", 10), ("youtube", 10), ("bl30k", 5),
                                           ("static", 0)])
def test_clips_shapes_ids_and_skips(data, tmp_path, kind, max_skip):
    out = tmp_path / kind
    run_job(JobConfig(kind, str(data[kind]), str(out), clips=9, clips_per_shard=4,
                      max_skip=max_skip or 5, **ALL.get(kind, {})), progress=False)
    manifest = shards.read_manifest(str(out))
    assert [s.count for s in manifest.shards] == [4, 4, 1]
    assert manifest.config["online"]["hflip"]["p"] == 0.5  # the trainer's online part
    samples = _samples(out)
    assert len(samples) == 9
    frame_step = 5 if kind == "youtube" else 1
    for s in samples.values():
        frames, masks, meta = s["frames"], s["masks"], s["meta"]
        assert frames.shape == (3, 384, 384, 3) and masks.shape == (3, 384, 384)
        ids = set(np.unique(masks).tolist())
        assert ids <= ({0, 1} if kind == "static" else set(range(0, 16)))
        assert set(meta["objects"]) <= set(np.unique(masks[0]).tolist()) - {0}
        if kind == "static":
            assert meta["frame_index"] == [0, 0, 0]
            assert np.array_equal(masks, s["soft"] > 127)  # soft masks kept; ids: soft > 0.5
            continue
        assert s["soft"] is None
        assert meta["objects"], "every video clip here has an eligible object"
        a, b, c = sorted(meta["frame_index"])
        # published rule: gaps up to J + 1 (J = listed max skip); end clamps may repeat a frame
        listed_skip = max_skip // frame_step
        assert 0 <= b - a <= listed_skip + 1 and 0 <= c - b <= listed_skip + 1
        raw = sorted(int(f) for f in meta["frames"])  # frame names are raw frame numbers
        assert raw[1] - raw[0] <= max_skip + frame_step and raw[2] - raw[1] <= max_skip + frame_step


def test_same_seed_same_bytes_whatever_workers_or_tasks(data, tmp_path):
    job = dict(kind="davis", source=str(data["davis"]), clips=10, clips_per_shard=3, max_skip=15,
               subset="all")
    run_job(JobConfig(out=str(tmp_path / "one"), **job), workers=1, progress=False)
    for index in (1, 0, 2):
        run_job(JobConfig(out=str(tmp_path / "split"), **job), workers=2,
                task=Task(index, 3), progress=False)
    assert _bytes(tmp_path / "one") == _bytes(tmp_path / "split")
    run_job(JobConfig(out=str(tmp_path / "other"), seed=1, **job), progress=False)
    assert _bytes(tmp_path / "other") != _bytes(tmp_path / "one")


def test_clips_sharing_decoded_frames_are_the_clips_made_alone(data, tmp_path):
    """A worker makes its unit's clips video by video, decoding a frame once for all the
    clips that draw it: they are the clips made one per unit (nothing shared)."""
    job = dict(kind="davis", source=str(data["davis"]), clips=12, max_skip=5, subset="all")
    run_job(JobConfig(out=str(tmp_path / "shared"), clips_per_shard=12, **job), progress=False)
    run_job(JobConfig(out=str(tmp_path / "alone"), clips_per_shard=1, **job), progress=False)
    shared, alone = _samples(tmp_path / "shared"), _samples(tmp_path / "alone")
    assert len(shared) == 12 and sorted(shared) == sorted(alone)
    drawn = [(s["meta"]["video"], f) for s in shared.values() for f in set(s["meta"]["frames"])]
    assert len(set(drawn)) < len(drawn)  # some frames were drawn by several clips
    for key, sample in shared.items():
        assert np.array_equal(sample["frames"], alone[key]["frames"]), key
        assert np.array_equal(sample["masks"], alone[key]["masks"]), key
        assert sample["meta"] == alone[key]["meta"], key


def test_task_split_covers_every_clip_once(data, tmp_path):
    job = JobConfig("youtube", str(data["youtube"]), str(tmp_path / "yt"), clips=11,
                    clips_per_shard=2, max_skip=25, subset="all")
    keys = []
    for index in range(4):
        infos = run_job(job, task=Task(index, 4), progress=False)
        for info in infos:
            keys += [s["__key__"] for s in shards.iter_shard(str(tmp_path / "yt" / info.name), info)]
        if index < 3:  # the set is not complete before the last task
            assert not (tmp_path / "yt" / "manifest.json").exists()
    assert len(keys) == len(set(keys)) == 11
    assert sorted(keys) == sorted(_samples(tmp_path / "yt"))
    # round-robin over the 3 videos: each video gives rounds 0..3 (11 = 3 + 3 + 3 + 2)
    rounds = sorted(int(k.rsplit("-", 1)[1]) for k in keys)
    assert rounds == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3]


def test_merge_names_missing_units(data, tmp_path):
    job = JobConfig("static", str(data["static"]), str(tmp_path / "s"), clips=6, clips_per_shard=2)
    run_job(job, task=Task(0, 2), progress=False)
    with pytest.raises(JobError, match="shard-000001"):
        merge(str(tmp_path / "s"))
    run_job(job, task=Task(1, 2), progress=False)
    assert merge(str(tmp_path / "s")).num_samples == 6


def test_other_config_into_same_set_is_refused(data, tmp_path):
    job = dict(kind="davis", source=str(data["davis"]), out=str(tmp_path / "d"), clips=2,
               clips_per_shard=2, subset="all")
    run_job(JobConfig(max_skip=5, **job), progress=False)
    with pytest.raises(JobError, match="another config"):
        run_job(JobConfig(max_skip=10, **job), progress=False)


def test_bl30k_tree_and_archives_give_the_same_clips(data, tmp_path):
    run_job(JobConfig("bl30k", str(data["bl30k"]), str(tmp_path / "tree"), clips_per_video=3,
                      clips_per_shard=4, max_skip=10), progress=False)
    run_job(JobConfig("bl30k", str(data["bl30k"] / "tars"), str(tmp_path / "tars"),
                      clips_per_video=3, clips_per_shard=2, max_skip=10), workers=2,
            progress=False)
    tree, tars = _samples(tmp_path / "tree"), _samples(tmp_path / "tars")
    assert len(tree) == 9 and sorted(tree) == sorted(tars)
    for key, sample in tree.items():
        assert np.array_equal(sample["frames"], tars[key]["frames"])
        assert np.array_equal(sample["masks"], tars[key]["masks"])
        assert sample["meta"] == tars[key]["meta"]
    with pytest.raises(JobError, match="clips-per-video"):
        run_job(JobConfig("bl30k", str(data["bl30k"] / "tars"), str(tmp_path / "x"),
                          clips=5, max_skip=5), progress=False)


def _make_shards(args, **popen):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(tool_command("make_shards", *args),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **popen)


def test_cli_defaults_to_the_published_list(data, tmp_path):
    """Synthetic DAVIS lacks the published videos: a one-line error naming one and the fix."""
    run = _make_shards(["davis", str(data["davis"]), "--out", str(tmp_path / "d"), "--max-skip",
                        "5", "--clips", "2", "--workers", "1", "--no-progress"])
    assert run.wait(60) == 1
    err = run.stderr.read().decode()
    assert "'bear' of the published davis train list is missing" in err and "--subset all" in err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("source", ["tree", "tars"])
def test_kill_and_resume_gives_the_uninterrupted_set(data, tmp_path, source):
    """kill -9 mid-run, rerun: same bytes as an uninterrupted run, nothing partial left."""
    src = str(data["bl30k"] / "tars") if source == "tars" else str(data["davis"])
    kind = "bl30k" if source == "tars" else "davis"
    common = [kind, src, "--max-skip", "5", "--clips-per-shard", "2", "--no-progress"]
    common += ["--clips-per-video", "8"] if source == "tars" else ["--clips", "24", "--subset", "all"]
    out = tmp_path / "killed"
    run = _make_shards([*common, "--out", str(out), "--workers", "2"], start_new_session=True)
    deadline = time.time() + 60
    while len(list(out.glob("_parts/*-*.json"))) < 2 and run.poll() is None \
            and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    assert not (out / "manifest.json").exists(), "killed before the end, yet complete?"
    finished = {p.stem: (out / f"{p.stem}.tar").stat().st_ino for p in (out / "_parts").glob("*-*.json")}
    rerun = _make_shards([*common, "--out", str(out), "--workers", "2"])
    assert rerun.wait(120) == 0, rerun.stderr.read().decode()
    whole = _make_shards([*common, "--out", str(tmp_path / "whole"), "--workers", "1"])
    assert whole.wait(120) == 0, whole.stderr.read().decode()
    assert _bytes(out) == _bytes(tmp_path / "whole")
    assert finished and all((out / f"{n}.tar").stat().st_ino == ino for n, ino in finished.items()), \
        "finished shards must be kept, not rewritten"
    leftovers = [p.name for p in out.rglob(".*")]
    assert leftovers == [], f"temporary files left behind: {leftovers}"
    manifest = json.loads((out / "manifest.json").read_text())
    names = [s["name"] for s in manifest["shards"]]
    assert sorted(p.name for p in out.glob("*.tar")) == names  # no extra, none missing


def test_pipelines_never_import_torch():
    code = "import sys, pipelines.driver, pipelines.bench; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.stdout.strip() == "False", out.stderr


def test_trainer_reads_the_online_steps():
    """The manifest's `online` entry is the contract with the trainer's device-side steps."""
    from pipelines.augment import ONLINE_STATIC, ONLINE_VIDEO
    from stcn.train.online_augment import OnlineAugmentation
    video = OnlineAugmentation.from_spec(ONLINE_VIDEO)
    assert video.flip_p == 0.5 and video.grayscale_p == 0.05
    assert (video.clip_jitter.brightness, video.clip_jitter.contrast) == (0.1, 0.03)
    assert video.frame_jitter.saturation == 0.01
    static = OnlineAugmentation.from_spec(ONLINE_STATIC)
    assert static.clip_jitter.hue == 0.05 and static.frame_jitter.brightness == 0.1
