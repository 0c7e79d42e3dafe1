"""run_job: make this task's shards (skipping finished ones), then merge if the set is
complete. Task t of T does the units u with u % T == t.

Listed sources: each unit is one shard, made and written by one worker.
Archives: the task streams each of its archives once, hands each video to a worker (which
returns its clips_per_video clips encoded) and cuts the clips, in archive order, into
shards `<archive>-%06d.tar`.
"""
from __future__ import annotations

import collections
import sys
import time

import shards
from shards.lease import Lease

from pipelines.job.clips import listed_encoded, video_clips
from pipelines.job.config import JobConfig, JobError, Task, warn
from pipelines.job.pool import Workers
from pipelines.job.records import (
    archive_done,
    merge,
    remove_stale_temps,
    shard_done,
    write_archive_record,
    write_shard_bytes,
)
from pipelines.job.units import Plan, listed_clips, make_plan, unit_name
from pipelines.sources import archive_name, iter_archive_videos


def run_job(job: JobConfig, workers: int = 1, task: Task | None = None,
            progress: bool = True) -> list[shards.ShardInfo]:
    """Make this task's shards (skipping finished ones), then merge if the set is complete.
    Returns the ShardInfos of this task's units."""
    task = task or Task()
    plan = make_plan(job)
    units = task.mine(plan.num_units())
    # One job per shard set: a second one stops here, naming the holder, before it touches
    # anything (shards.lease); array tasks of one SLURM job share the lease.
    with Lease(job.out, log=warn):
        with Workers(plan, workers) as pool:
            run = _run_archives if plan.from_archives else _run_listed
            infos = run(plan, units, pool, progress)
        try:
            merge(job.out)
        except JobError as err:
            print(f"make_shards: task {task.index} of {task.count} done; {err}: the last task to "
                  f"finish writes manifest.json (or run `tools/make_shards merge {job.out}` once "
                  "every task has ended)", file=sys.stderr)
    return infos


def _listed_unit(plan: Plan, unit: int, count) -> shards.ShardInfo:
    """(In a worker) make and write the shard of listed unit `unit`."""
    return write_shard_bytes(plan, unit_name(unit),
                             listed_encoded(plan, *plan.unit_range(unit), count))


def _run_listed(plan: Plan, units: list[int], pool: Workers, progress: bool):
    job = plan.job
    names = {u: unit_name(u) for u in units}
    stems = {n.removesuffix(".tar") for n in names.values()}
    remove_stale_temps(job.out, stems.__contains__)
    done = {u: shard_done(plan, names[u]) for u in units}
    todo = [u for u in units if done[u] is None]
    total = sum(len(listed_clips(plan, u)) for u in todo)
    with pool.progress(total, f"{job.kind} -> {job.out}", progress) as bar:
        pending = {}
        for u in todo:  # without a pool, each unit is made right here
            pending[u] = pool.submit(_listed_unit, u)
            bar.drain()
        while pending:
            for u in [u for u, r in pending.items() if r.ready()]:
                done[u] = pending.pop(u).get()  # re-raises a worker's error here
            if pending:
                time.sleep(0.2)
            bar.drain()
    return [done[u] for u in units]


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

    def mine(self, stem: str) -> bool:
        """Whether a file stem is one of this archive's shards or its record."""
        return stem.startswith(f"{self.stem}-") or stem == f"{self.stem}.archive"

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
            info = write_shard_bytes(self.plan, self.name(self._index), self._buffer)
            self.infos[self._index] = info
            self._buffer = []


def _run_archives(plan: Plan, units: list[int], pool: Workers, progress: bool):
    """Stream each archive of this task once. Every video goes to a worker with the rounds
    still missing (those of finished shards are skipped), workers return encoded clips, and
    this process cuts them into shards in stream order. At most 2 videos per worker are in
    flight, plus one shard of encoded clips: that is the memory bound."""
    job, infos = plan.job, []
    for unit in units:
        url = plan.source[unit]
        finished = archive_done(plan, url)
        if finished is not None:
            infos += finished
            continue
        cutter = _ArchiveShards(plan, url)
        remove_stale_temps(job.out, cutter.mine)
        in_flight: collections.deque = collections.deque()

        # bound as defaults: this unit's queue and cutter, not whatever the loop holds later
        def take_oldest(in_flight=in_flight, cutter=cutter):
            result, indices = in_flight.popleft()
            for index, encoded in zip(indices, result.get()):
                cutter.add(index, encoded)

        with pool.progress(None, f"{job.kind} {cutter.stem} -> {job.out}", progress) as bar:
            ordinal = 0
            for video, frames in iter_archive_videos(url):
                rounds, indices = [], []
                for round_ in range(job.clips_per_video):
                    index = ordinal // job.clips_per_shard
                    ordinal += 1
                    if not cutter.finished(index):
                        rounds.append(round_)
                        indices.append(index)
                if rounds:
                    in_flight.append((pool.submit(video_clips, video, frames, rounds), indices))
                while in_flight and (len(in_flight) > 2 * pool.size or in_flight[0][0].ready()):
                    take_oldest()
                bar.drain()
            while in_flight:
                take_oldest()
                bar.drain()
            cutter.flush()
        unit_infos = [cutter.infos[i] for i in sorted(cutter.infos)]
        write_archive_record(plan, url, unit_infos)
        infos += unit_infos
    return infos
