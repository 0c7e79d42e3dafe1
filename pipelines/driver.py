"""The shard-making job: parallel, split into SLURM array tasks, resumable, idempotent.

Work units
    Listed sources (static, DAVIS, YouTubeVOS, an extracted BL30K): clip i of the set is
    `clips.clip_order(...)[i]`; unit u is shard `shard-%06d.tar` holding clips
    [u * clips_per_shard, (u + 1) * clips_per_shard). Task t of T does the units u with
    u % T == t, each unit in one worker process.
    BL30K tar archives: unit a is archive a (task t does a % T == t); the task streams it
    once, hands each video to a worker (which returns its clips_per_video clips encoded)
    and cuts the clips, in archive order, into shards `<archive>-%06d.tar`.

Resumption
    A unit's shard is written atomically (shards.write_shard), THEN its part record
    `_parts/<shard>.json` (a one-shard manifest carrying the job config). A rerun skips every
    shard whose part record exists with the same config and whose file has the recorded
    size, and regenerates the others (byte-identical: clips are pure functions of the seed).
    Killed at any point, a rerun ends with exactly the same shard set as an uninterrupted run.

Manifest
    `merge` collects the part records into `manifest.json` once every unit is done; each task
    tries it when it finishes, so the last one to finish writes it (identical content
    whichever does). Nothing in the manifest depends on --workers or --num-tasks.
"""
from __future__ import annotations

import collections
import hashlib
import json
import math
import multiprocessing
import os
import re
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2

import shards
from shards import console, storage
from shards.lease import Lease

from pipelines.augment import (BL30K_AUGMENT, ONLINE_STATIC, ONLINE_VIDEO, STATIC_AUGMENT,
                               VIDEO_AUGMENT)
from pipelines.clips import clip_order, make_static_clip, make_video_clip
from pipelines.sources import (MemoryFrames, archive_name, iter_archive_videos, list_archives,
                               open_bl30k_tree, open_davis, open_static, open_youtube)

#: Bump when a change to the pipeline changes the clips a config produces.
PIPELINE_VERSION = 2  # 2: the published triplet rule (gaps up to J + 1, end clamps), --subset,
#                       per-step canvases and fill, static soft masks
PARTS = "_parts"
KINDS = ("static", "davis", "youtube", "bl30k")


class JobError(RuntimeError):
    """A job cannot run or finish as asked (the message says why and what to do)."""


@dataclass(frozen=True)
class JobConfig:
    kind: str                          # static | davis | youtube | bl30k
    source: str                        # data root (or BL30K tar directory / .tar URL)
    out: str                           # shard set URL
    clips: int | None = None           # clips in the set (listed sources)
    max_skip: int = 5                  # curriculum max skip, raw frames (video sources)
    clips_per_video: int | None = None  # BL30K archives: clips per video
    clips_per_shard: int = 500
    seed: int = 0
    static_sets: tuple[str, ...] | None = None  # static: a subset of STATIC_SETS
    #: DAVIS/YouTubeVOS videos: "published" (the shipped train list), "all" or a list file
    subset: str = "published"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise JobError(f"unknown source kind {self.kind!r}; expected one of {KINDS}")
        if self.clips_per_shard < 1:
            raise JobError("--clips-per-shard must be >= 1")
        if self.kind != "static" and self.max_skip < 1:
            raise JobError("--max-skip must be >= 1 (curriculum units: 5, 10, 15, 20, 25)")
        if self.kind not in ("davis", "youtube") and self.subset != "published":
            raise JobError(f"--subset applies to davis and youtube, not {self.kind}")


@dataclass
class Task:
    index: int = 0
    count: int = 1

    @classmethod
    def from_env(cls, index: int | None, count: int | None) -> "Task":
        """--task-index/--num-tasks, defaulting from the SLURM array environment."""
        env = os.environ
        if index is None:
            index = int(env.get("SLURM_ARRAY_TASK_ID", 0)) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        if count is None:
            count = int(env.get("SLURM_ARRAY_TASK_COUNT", 1))
        if not 0 <= index < count:
            raise JobError(f"task index {index} is outside 0..{count - 1}")
        return cls(index, count)


# ----------------------------------------------------------------------------- the job's plan

@dataclass
class Plan:
    """Everything a worker needs to make clips, plus the manifest config (pure data)."""
    job: JobConfig
    source: object                     # VideoTree | StaticSource | list of archive URLs
    config: dict = field(default_factory=dict)

    @property
    def from_archives(self) -> bool:
        return isinstance(self.source, list)

    def num_units(self) -> int:
        if self.from_archives:
            return len(self.source)
        return math.ceil(self.job.clips / self.job.clips_per_shard)


def open_source(job: JobConfig):
    if job.kind == "static":
        return open_static(job.source, job.static_sets)
    if job.kind == "davis":
        return open_davis(job.source, job.subset)
    if job.kind == "youtube":
        return open_youtube(job.source, job.subset)
    root = Path(job.source)
    if "://" in job.source or job.source.endswith(".tar") or not (
            (root / "JPEGImages").is_dir() or (root / "BL30K" / "JPEGImages").is_dir()):
        return list_archives(job.source)
    return open_bl30k_tree(job.source)


def make_plan(job: JobConfig) -> Plan:
    source = open_source(job)
    plan = Plan(job, source)
    if plan.from_archives:
        if not job.clips_per_video:
            raise JobError("BL30K from tar archives needs --clips-per-video (the number of "
                           "videos is only known after streaming; see `make_shards plan`)")
        job = replace(job, clips=None)
    elif job.clips is None or job.clips < 1:
        if job.clips_per_video and job.kind != "static":
            job = replace(job, clips=job.clips_per_video * len(source.videos))
        else:
            raise JobError("--clips N (>= 1) is required")
    plan.job = job
    if job.kind == "static":
        augment, online = STATIC_AUGMENT.to_dict(), ONLINE_STATIC
        items = {"images": source.sets, "items": len(source.items)}
    else:
        augment = (BL30K_AUGMENT if job.kind == "bl30k" else VIDEO_AUGMENT).to_dict()
        online = ONLINE_VIDEO
        items = ({"archives": [archive_name(a) for a in source]} if plan.from_archives
                 else {"videos": len(source.videos)})
        too_short = list(getattr(source, "too_short", ()))
        if not plan.from_archives:
            items["too_short_videos"] = too_short  # recorded in the manifest's config
        if too_short:
            _warn(f"{len(too_short)} listed video(s) of {job.source} have fewer than 3 frames "
                  f"and are left out (no triplet fits): {', '.join(too_short[:10])}"
                  + (", ..." if len(too_short) > 10 else ""))
        if job.kind in ("davis", "youtube"):  # which videos, not where the list file was
            items["subset"] = job.subset if job.subset in ("published", "all") else "file"
            items["video_names_sha256"] = hashlib.sha256(
                "\n".join(v.name for v in source.videos).encode()).hexdigest()
    plan.config = {"pipeline_version": PIPELINE_VERSION, "source": job.kind, "seed": job.seed,
                   "clips": job.clips, "clips_per_shard": job.clips_per_shard,
                   "clips_per_video": job.clips_per_video if plan.from_archives else None,
                   "max_skip": job.max_skip if job.kind != "static" else 0,
                   "size_rule": job.kind == "bl30k", "augment": augment, "online": online,
                   **items}
    # as it reads back from a manifest (tuples become lists), so records compare equal
    plan.config = json.loads(json.dumps(plan.config))
    return plan


# --------------------------------------------------------------------------- making clips

def make_clip(plan: Plan, item, round_: int, store=None) -> dict:
    """Clip `round_` of `item`: an index into the listed source's videos or images, or,
    with `store` (a FrameStore holding a streamed video), that `Video`."""
    job = plan.job
    if job.kind == "static":
        return make_static_clip(plan.source, plan.source.items[item], round_, seed=job.seed,
                                aug=STATIC_AUGMENT)
    if store is None:
        store, video = plan.source, plan.source.videos[item]
    else:
        video = item
    frame_step = getattr(plan.source, "frame_step", 1)
    return make_video_clip(store, video, round_, kind=job.kind, seed=job.seed,
                           max_skip=job.max_skip, frame_step=frame_step,
                           aug=BL30K_AUGMENT if job.kind == "bl30k" else VIDEO_AUGMENT,
                           size_rule=job.kind == "bl30k")


def listed_clips(plan: Plan, unit: int) -> list[tuple[int, int]]:
    """(item index, round) of the clips of listed-source unit `unit`."""
    job = plan.job
    count = len(plan.source.items if job.kind == "static" else plan.source.videos)
    start = unit * job.clips_per_shard
    return clip_order(job.seed, job.kind, count, start, min(job.clips, start + job.clips_per_shard))


def listed_samples(plan: Plan, start: int, stop: int):
    """Clips start..stop-1 of a listed source's set, in set order, as a worker makes them
    (the benchmark times this too)."""
    count = len(plan.source.items if plan.job.kind == "static" else plan.source.videos)
    for item, round_ in clip_order(plan.job.seed, plan.job.kind, count, start, stop):
        yield make_clip(plan, item, round_)


def part_url(out: str, shard_name: str) -> str:
    return storage.join(storage.join(out, PARTS), shard_name.removesuffix(".tar") + ".json")


def shard_done(plan: Plan, shard_name: str) -> shards.ShardInfo | None:
    """The recorded ShardInfo if this shard is complete and made with this config."""
    url = part_url(plan.job.out, shard_name)
    if not storage.exists(url):
        return None
    part = shards.read_manifest(url)
    if part.config != plan.config:
        raise JobError(f"{plan.job.out} holds shards made with another config (see {url}); "
                       "write to a new --out, or delete that set to regenerate it")
    info = part.shards[0]
    if storage.size(storage.join(plan.job.out, shard_name)) != info.bytes:
        return None
    return info


def write_unit(plan: Plan, shard_name: str, samples, progress=None) -> shards.ShardInfo:
    """Write one shard then its part record (in that order: see module doc)."""
    def counted():
        for sample in samples:
            yield sample
            if progress is not None:
                progress(1)
    info = shards.write_shard(storage.join(plan.job.out, shard_name), counted())
    shards.write_manifest(part_url(plan.job.out, shard_name),
                          shards.Manifest(shards=[info], config=plan.config))
    return info


# ------------------------------------------------------------------------- worker processes

_PLAN: Plan | None = None
_COUNTER = None


def _init_worker(plan: Plan, counter) -> None:
    global _PLAN, _COUNTER
    cv2.setNumThreads(1)  # one process per core; OpenCV threads would oversubscribe
    _PLAN, _COUNTER = plan, counter


def _count(n: int) -> None:
    with _COUNTER.get_lock():
        _COUNTER.value += n


def _listed_unit(unit: int) -> shards.ShardInfo:
    plan = _PLAN
    start = unit * plan.job.clips_per_shard
    clips = listed_samples(plan, start, min(plan.job.clips, start + plan.job.clips_per_shard))
    return write_unit(plan, f"shard-{unit:06d}.tar", clips, _count)


def _video_clips(args) -> list[dict[str, bytes]]:
    """Encoded clips `rounds` of one streamed video (encoding here, in the worker)."""
    video, frames, rounds = args
    store = MemoryFrames({video.name: frames})
    encoded = []
    for round_ in rounds:
        encoded.append(shards.encode_sample(make_clip(_PLAN, video, round_, store)))
        _count(1)
    return encoded


# ----------------------------------------------------------------------------- the job

def _remove_stale_temps(out: str, mine) -> None:
    """Delete temporary files a killed run left for this task's shards and records (atomic
    writes go through hidden `.NAME.tmp-*` files, see shards.storage); `mine(stem)` says
    whether a target belongs to this task. Called under the set's lease (shards.lease), so
    their writer is dead: a live one would hold the lease, or be this very job's other
    task, whose units `mine` excludes."""
    removed = 0
    for directory in (out, storage.join(out, PARTS)):
        for entry in storage.listdir(directory):  # [] when there is no such directory
            target = storage.temp_target(entry.rsplit("/", 1)[-1])
            match = re.fullmatch(r"(.+)\.(tar|json)", target or "")
            if match and mine(match.group(1)):
                storage.remove(entry)
                removed += 1
    if removed:
        print(f"make_shards: removed {removed} temporary file(s) in {out} left by a killed run",
              file=sys.stderr)


def _warn(message: str) -> None:
    print(f"make_shards: warning: {message}", file=sys.stderr)


def run_job(job: JobConfig, workers: int = 1, task: Task | None = None,
            progress: bool = True) -> list[shards.ShardInfo]:
    """Make this task's shards (skipping finished ones), then merge if the set is complete.
    Returns the ShardInfos of this task's units."""
    task = task or Task()
    plan = make_plan(job)
    units = [u for u in range(plan.num_units()) if u % task.count == task.index]
    # One job per shard set: a second one stops here, naming the holder, before it touches
    # anything (shards.lease); array tasks of one SLURM job share the lease.
    with Lease(job.out, log=_warn):
        ctx = multiprocessing.get_context("fork")
        counter = ctx.Value("q", 0)
        pool = ctx.Pool(workers, _init_worker, (plan, counter)) if workers > 1 else None
        if pool is None:
            _init_worker(plan, counter)
        try:
            if plan.from_archives:
                infos = _run_archives(plan, units, pool, workers, counter, progress)
            else:
                infos = _run_listed(plan, units, pool, counter, progress)
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
        try:
            merge(job.out)
        except JobError as err:
            print(f"make_shards: task {task.index} of {task.count} done; {err}: the last task to "
                  f"finish writes manifest.json (or run `tools/make_shards merge {job.out}` once "
                  "every task has ended)", file=sys.stderr)
    return infos


def _bar(total, progress: bool, desc: str):
    return console.progress(total=total, unit="clip", desc=desc, enabled=progress)


def _drain(bar, counter, last: list) -> None:
    value = counter.value
    bar.update(value - last[0])
    last[0] = value


def _run_listed(plan: Plan, units: list[int], pool, counter, progress: bool):
    job = plan.job
    names = {u: f"shard-{u:06d}.tar" for u in units}
    stems = {n.removesuffix(".tar") for n in names.values()}
    _remove_stale_temps(job.out, stems.__contains__)
    done = {u: shard_done(plan, names[u]) for u in units}
    todo = [u for u in units if done[u] is None]
    total = sum(len(listed_clips(plan, u)) for u in todo)
    with _bar(total, progress, f"{job.kind} -> {job.out}") as bar:
        last = [counter.value]
        if pool is None:
            for u in todo:
                done[u] = _listed_unit(u)
                _drain(bar, counter, last)
        else:
            pending = {u: pool.apply_async(_listed_unit, (u,)) for u in todo}
            while pending:
                time.sleep(0.2)
                _drain(bar, counter, last)
                for u in [u for u, r in pending.items() if r.ready()]:
                    done[u] = pending.pop(u).get()  # re-raises a worker's error here
            _drain(bar, counter, last)
    return [done[u] for u in units]


def archive_record_url(out: str, url: str) -> str:
    return storage.join(storage.join(out, PARTS), f"{archive_name(url)}.archive.json")


class _ArchiveShards:
    """Cuts one archive's clips, in stream order, into shards `<archive>-%06d.tar` of
    clips_per_shard; knows which of them a killed run already finished."""

    def __init__(self, plan: Plan, url: str):
        self.plan, self.stem = plan, archive_name(url)
        self.infos: dict[int, shards.ShardInfo] = {}
        self._done: dict[int, shards.ShardInfo | None] = {}
        self._index, self._buffer = None, []

    def name(self, index: int) -> str:
        return f"{self.stem}-{index:06d}.tar"

    def finished(self, index: int) -> bool:
        if index not in self._done:
            self._done[index] = shard_done(self.plan, self.name(index))
            if self._done[index] is not None:
                self.infos[index] = self._done[index]
        return self._done[index] is not None

    def add(self, index: int, encoded: dict[str, bytes]) -> None:
        """Clips arrive in stream order: a new shard index means the previous one is full."""
        if index != self._index:
            self.flush()
            self._index = index
        self._buffer.append(encoded)

    def flush(self) -> None:
        if self._buffer:
            name = self.name(self._index)
            info = write_shard_bytes(self.plan, name, self._buffer)
            self.infos[self._index] = info
            self._buffer = []


def write_shard_bytes(plan: Plan, shard_name: str, encoded: list) -> shards.ShardInfo:
    """write_unit for already encoded samples (same bytes, same record)."""
    from shards.writer import write_encoded_shard
    info = write_encoded_shard(storage.join(plan.job.out, shard_name), encoded)
    shards.write_manifest(part_url(plan.job.out, shard_name),
                          shards.Manifest(shards=[info], config=plan.config))
    return info


def _run_archives(plan: Plan, units: list[int], pool, workers: int, counter, progress: bool):
    """Stream each archive of this task once. Every video goes to a worker with the rounds
    still missing (those of finished shards are skipped), workers return encoded clips, and
    this process cuts them into shards in stream order. At most 2 videos per worker are in
    flight, plus one shard of encoded clips: that is the memory bound."""
    job, infos = plan.job, []
    for unit in units:
        url = plan.source[unit]
        record = archive_record_url(job.out, url)
        if storage.exists(record):
            manifest = shards.read_manifest(record)
            if manifest.config == plan.config and all(shard_done(plan, s.name) for s in manifest.shards):
                infos += manifest.shards
                continue
        cutter = _ArchiveShards(plan, url)
        _remove_stale_temps(job.out, lambda name: name.startswith(f"{cutter.stem}-")
                            or name == f"{cutter.stem}.archive")
        in_flight: collections.deque = collections.deque()

        def take_oldest():
            result, indices = in_flight.popleft()
            for index, encoded in zip(indices, result.get() if pool else result):
                cutter.add(index, encoded)

        with _bar(None, progress, f"bl30k {cutter.stem} -> {job.out}") as bar:
            last, ordinal = [counter.value], 0
            for video, frames in iter_archive_videos(url):
                rounds, indices = [], []
                for round_ in range(job.clips_per_video):
                    index = ordinal // job.clips_per_shard
                    ordinal += 1
                    if not cutter.finished(index):
                        rounds.append(round_)
                        indices.append(index)
                if rounds:
                    args = (video, frames, rounds)
                    in_flight.append((pool.apply_async(_video_clips, (args,)) if pool
                                      else _video_clips(args), indices))
                while in_flight and (len(in_flight) > 2 * workers or
                                     not pool or in_flight[0][0].ready()):
                    take_oldest()
                _drain(bar, counter, last)
            while in_flight:
                take_oldest()
                _drain(bar, counter, last)
            cutter.flush()
        unit_infos = [cutter.infos[i] for i in sorted(cutter.infos)]
        shards.write_manifest(record, shards.Manifest(shards=unit_infos, config=plan.config))
        infos += unit_infos
    return infos


# ----------------------------------------------------------------------------- merging

def merge(out: str) -> shards.Manifest:
    """Write `manifest.json` from the part records once every unit of the set is done;
    JobError naming what is missing otherwise."""
    entries = sorted(e.rsplit("/", 1)[-1] for e in storage.listdir(storage.join(out, PARTS)))
    if not entries:
        raise JobError(f"{out}: no {PARTS}/ records; is this a make_shards output?")
    records = {e for e in entries if e.endswith(".json") and not e.startswith(".")}
    if not records:
        raise JobError(f"{out}: no finished unit yet")
    any_part = shards.read_manifest(storage.join(storage.join(out, PARTS), sorted(records)[0]))
    config = any_part.config
    if "archives" in config:
        expected = [f"{a}.archive.json" for a in config["archives"]]
    else:
        units = math.ceil(config["clips"] / config["clips_per_shard"])
        expected = [f"shard-{u:06d}.json" for u in range(units)]
    missing = [e for e in expected if e not in records]
    if missing:
        raise JobError(f"{len(missing)} of {len(expected)} units of {out} are not finished "
                       f"(first: {missing[0].removesuffix('.json')})")
    parts = [shards.read_manifest(storage.join(storage.join(out, PARTS), e)) for e in expected]
    manifest = shards.merge_manifests(parts)
    shards.write_manifest(out, manifest)
    return manifest
