"""The job's plan: the opened source, the config every record carries, and the work units.

Listed sources (static, DAVIS, YouTubeVOS, an extracted BL30K): clip i of the set is
`clips.clip_order(...)[i]`; unit u is shard `shard-%06d.tar` holding clips
[u * clips_per_shard, (u + 1) * clips_per_shard).
Tar archives (BL30K): unit a is archive a; its clips, clips_per_video per video in stream
order, are cut into shards `<archive>-%06d.tar`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace

from pipelines.clips import clip_order
from pipelines.job.config import JobConfig, JobError, warn
from pipelines.kinds import SourceKind, source_kind

#: Bump when a change to the pipeline changes the clips a config produces.
PIPELINE_VERSION = 2  # 2: the published triplet rule (gaps up to J + 1, end clamps), --subset,
#                       per-step canvases and fill, static soft masks


@dataclass
class Plan:
    """Everything a worker needs to make clips, plus the manifest config (pure data)."""
    job: JobConfig
    source: object                     # a listed source (VideoTree | StaticSource | ...) or
    #                                    a list of archive URLs
    config: dict = field(default_factory=dict)

    @property
    def kind(self) -> SourceKind:
        return source_kind(self.job.kind)

    @property
    def from_archives(self) -> bool:
        return isinstance(self.source, list)

    @property
    def items(self):
        """The items a listed source's clips draw from."""
        return self.kind.items(self.source)

    def num_units(self) -> int:
        if self.from_archives:
            return len(self.source)
        return math.ceil(self.job.clips / self.job.clips_per_shard)

    def unit_range(self, unit: int) -> tuple[int, int]:
        """Clips start..stop-1 of the set that listed-source unit `unit` holds."""
        start = unit * self.job.clips_per_shard
        return start, min(self.job.clips, start + self.job.clips_per_shard)


def unit_name(unit: int) -> str:
    """The shard of listed-source unit `unit`."""
    return f"shard-{unit:06d}.tar"


def make_plan(job: JobConfig) -> Plan:
    kind = source_kind(job.kind)
    source = kind.open(job)
    plan = Plan(job, source)
    if plan.from_archives:
        if not job.clips_per_video:
            raise JobError(f"{job.kind} from tar archives needs --clips-per-video (the number "
                           "of videos is only known after streaming; see `make_shards plan`)")
        job = replace(job, clips=None)
    elif job.clips is None or job.clips < 1:
        if job.clips_per_video and kind.video:
            job = replace(job, clips=job.clips_per_video * len(kind.items(source)))
        else:
            raise JobError("--clips N (>= 1) is required")
    plan.job = job
    too_short = list(getattr(source, "too_short", ()))
    if too_short:
        warn(f"{len(too_short)} listed video(s) of {job.source} have fewer than 3 frames "
             f"and are left out (no triplet fits): {', '.join(too_short[:10])}"
             + (", ..." if len(too_short) > 10 else ""))
    plan.config = {"pipeline_version": PIPELINE_VERSION, "source": job.kind, "seed": job.seed,
                   "clips": job.clips, "clips_per_shard": job.clips_per_shard,
                   "clips_per_video": job.clips_per_video if plan.from_archives else None,
                   "max_skip": job.max_skip if kind.video else 0,
                   "size_rule": kind.size_rule, "augment": kind.augment.to_dict(),
                   "online": kind.online, **kind.describe(job, source)}
    # as it reads back from a manifest (tuples become lists), so records compare equal
    plan.config = json.loads(json.dumps(plan.config))
    return plan


def listed_clips(plan: Plan, unit: int) -> list[tuple[int, int]]:
    """(item index, round) of the clips of listed-source unit `unit`."""
    return clip_order(plan.job.seed, plan.job.kind, len(plan.items), *plan.unit_range(unit))
