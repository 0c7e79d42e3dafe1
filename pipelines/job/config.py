"""What a shard job is asked to do: the job config (validated against its source kind) and
the task of a SLURM array it runs as."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from pipelines.kinds import KINDS


class JobError(RuntimeError):
    """A job cannot run or finish as asked (the message says why and what to do)."""


@dataclass(frozen=True)
class JobConfig:
    kind: str                          # a registered source kind (pipelines.kinds.KINDS)
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
        kind = KINDS.get(self.kind)
        if kind is None:
            raise JobError(f"unknown source kind {self.kind!r}; expected one of {tuple(KINDS)}")
        if self.clips_per_shard < 1:
            raise JobError("--clips-per-shard must be >= 1")
        if kind.video and self.max_skip < 1:
            raise JobError("--max-skip must be >= 1 (curriculum units: 5, 10, 15, 20, 25)")
        if not kind.subset and self.subset != "published":
            takers = " and ".join(k.name for k in KINDS.values() if k.subset)
            raise JobError(f"--subset applies to {takers}, not {self.kind}")


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

    def mine(self, units: int) -> list[int]:
        """The units of `units` this task does: u % count == index."""
        return [u for u in range(units) if u % self.count == self.index]


def warn(message: str) -> None:
    print(f"make_shards: warning: {message}", file=sys.stderr)
