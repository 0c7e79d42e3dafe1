"""The shard-making job: parallel, split into SLURM array tasks, resumable, idempotent.

This is the front door; the pieces live in `pipelines.job` (config, units, clips, records,
pool, run) and what differs between source kinds in `pipelines.kinds`.

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
from pipelines.job.clips import listed_encoded, make_clip
from pipelines.job.config import JobConfig, JobError, Task
from pipelines.job.records import PARTS, merge, part_url, shard_done
from pipelines.job.run import run_job
from pipelines.job.units import PIPELINE_VERSION, Plan, listed_clips, make_plan
from pipelines.kinds import KINDS, SourceKind, register_kind

__all__ = ["JobConfig", "JobError", "KINDS", "PARTS", "PIPELINE_VERSION", "Plan", "SourceKind",
           "Task", "listed_clips", "listed_encoded", "make_clip", "make_plan", "merge",
           "part_url", "register_kind", "run_job", "shard_done"]
