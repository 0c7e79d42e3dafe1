"""How many clips, in which shard sets, a published training stage needs, and their size.

The stage schedule itself lives with the trainer (`stcn.train.stages`); `tools/make_shards plan`
passes it in, so this module only needs its shape: iterations, batch size, per source
weights, the max-skip phases and `set_range` (duck-typed, no import of stcn).

Every clip a stage consumes is distinct by default, as with the published loader (it draws
a fresh clip each time it uses a sample):
  - a phase streams iterations x batch per GPU x GPUs clips; each source gets its share of
    the published mix, weight x videos (DAVIS x5 + YouTubeVOS x1: five DAVIS clips per
    DAVIS video for each YouTubeVOS one), and each of those clips is streamed once;
  - phases that share a max skip share its set and read disjoint ranges of it, split by
    their iterations (`StageConfig.set_range`, the trainer's rule), so the set holds the sum;
  - GPUs: the most the stage will run on. Fewer consume less; an elastic resume onto more
    needs more clips, and the trainer refuses a phase whose range is short (unless told to
    repeat clips with `tools/train --allow-repeats`).
With --clips-fraction F < 1, only F of those clips are made and the trainer streams each
~1/F times (plan prints how many; training then needs --allow-repeats).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from pipelines.kinds import KINDS, PerKind

#: Training videos (images for static) per source kind, and measured bytes per 384x384 clip:
#: live views of the source kind registry (pipelines.kinds, where the figures come from).
SOURCE_ITEMS = PerKind("plan_items")
BYTES_PER_CLIP = PerKind("bytes_per_clip")


@dataclass(frozen=True)
class SetNeed:
    phase: int
    iterations: tuple[int, int]
    source: str
    max_skip: int | None
    name: str        # shard set path under the root
    clips: int       # clips the phase streams from this set
    make: int        # clips of the set this phase reads (its range); < clips: repeats
    bytes: int

    @property
    def times_streamed(self) -> float:
        """How many times each clip of the phase's range is streamed (1: never repeated)."""
        return self.clips / self.make if self.make else math.inf


def set_name(source: str, max_skip: int | None) -> str:
    """The shard set naming the trainer relies on."""
    return source if max_skip is None else f"{source}/skip{max_skip}"


def plan_stage(stage, gpus: int, clips_fraction: float = 1.0,
               bytes_per_clip: dict[str, int] | None = None) -> list[SetNeed]:
    """Per phase and source: the shard set, the clips streamed and made, estimated bytes."""
    if gpus < 1 or not 0 < clips_fraction <= 1:
        raise ValueError("gpus must be >= 1 and clips_fraction in (0, 1]")
    sizes = {**BYTES_PER_CLIP, **(bytes_per_clip or {})}
    weighted = {s: w * SOURCE_ITEMS[s] for s, w in stage.sources.items()}
    total_weight = sum(weighted.values())
    needs = []
    for index, phase in enumerate(stage.phases):
        start, end = stage.phase_start_iteration(index), stage.phase_end_iteration(index)
        phase_clips = (end - start) * stage.batch_size * gpus
        for source in stage.sources:
            clips = math.ceil(phase_clips * weighted[source] / total_weight)
            make = max(math.ceil(clips * clips_fraction), min(clips, SOURCE_ITEMS[source]))
            needs.append(SetNeed(index, (start, end), source, phase.max_skip,
                                 set_name(source, phase.max_skip), clips, make,
                                 make * sizes[source]))
    return needs


def per_set(needs: list[SetNeed], stage=None) -> dict[str, int]:
    """Clips to make per shard set: the phases sharing a set (skip 5 opens and closes the
    curriculum) read disjoint ranges of it, so it holds their sum. With `stage`, rounded up
    until the trainer's split (stage.set_range) gives every phase at least its clips."""
    users: dict[str, list[SetNeed]] = {}
    for need in needs:
        users.setdefault(need.name, []).append(need)
    totals = {}
    for name, group in users.items():
        total = sum(n.make for n in group)
        if stage is not None:
            phases = [n.phase for n in group]
            while any(_width(stage.set_range(phases, n.phase, total)) < n.make for n in group):
                total += 1
        totals[name] = total
    return totals


def _width(span: tuple[int, int]) -> int:
    return span[1] - span[0]


def format_plan(stage, gpus: int, needs: list[SetNeed], root: str, bytes_per_clip=None) -> str:
    sizes = {**BYTES_PER_CLIP, **(bytes_per_clip or {})}
    lines = [f"stage {stage.stage}: {stage.iterations} iterations x batch {stage.batch_size} "
             f"x {gpus} GPU(s) (at most; an elastic resume onto more GPUs needs more clips)"]
    for need in needs:
        lo, hi = need.iterations
        skip = "static" if need.max_skip is None else f"max skip {need.max_skip}"
        times = (f", each clip streamed {need.times_streamed:.2f} times" if need.clips > need.make
                 else "")
        lines.append(f"  phase {need.phase} [{lo}, {hi}) {skip:12s} {root}/{need.name}: "
                     f"streams {need.clips:,} clips, make {need.make:,}{times} "
                     f"(~{need.bytes / 1e9:.1f} GB)")
    if any(n.clips > n.make for n in needs):
        lines.append("clips are streamed more than once (--clips-fraction): train with "
                     "tools/train --allow-repeats")
    lines.append("shard sets to make (phases sharing a set read disjoint parts of it: the sum):")
    total = 0
    for name, clips in per_set(needs, stage).items():
        source = name.split("/")[0]
        size = clips * sizes[source]
        total += size
        skip = f" --max-skip {name.split('skip')[1]}" if "/skip" in name else ""
        extra = (f"  (from archives: --clips-per-video "
                 f"{math.ceil(clips / SOURCE_ITEMS[source])})" if KINDS[source].archives else "")
        lines.append(f"  tools/make_shards {source} SRC --out {root}/{name}{skip} --clips {clips}"
                     f"   # ~{size / 1e9:.1f} GB{extra}")
    lines.append(f"total ~{total / 1e9:.1f} GB at "
                 + ", ".join(f"{s} {b / 1e3:.0f} KB" for s, b in sizes.items()) + " per clip")
    return "\n".join(lines)
