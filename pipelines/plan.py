"""How many clips, in which shard sets, a published training stage needs, and their size.

The stage schedule itself lives with the trainer (`stcn.stages`); `tools/make_shards plan`
passes it in, so this module only needs its shape: iterations, batch size, per source
weights and the max-skip phases (duck-typed, no import of stcn).

Clips per phase = iterations in the phase x batch per GPU x GPUs. A phase mixing several
sources streams each set `weight` times per epoch (shards.ShardSource), so the sets are
sized in proportion to their number of videos: the mix then matches the published
ConcatDataset (DAVIS x5 + YouTubeVOS). With --clips-fraction F < 1, F of those clips are
made and the loader repeats them 1/F times.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

#: Training videos (images for static) per source in the official releases.
SOURCE_ITEMS = {"static": 1, "bl30k": 29_989, "davis": 60, "youtube": 3_471}

#: Bytes per clip of 384x384 shards (3 JPEG frames q90 + masks + meta + tar headers),
#: measured with make_shards on the synthetic sets at their real sizes (80 clips each,
#: max skip 25; README, section pipelines). Real footage has more texture than the
#: synthetic scenes: after a first real run, pass --bytes-per-clip (manifest bytes / clips).
BYTES_PER_CLIP = {"static": 70_000, "bl30k": 66_000, "davis": 65_000, "youtube": 60_000}


@dataclass(frozen=True)
class SetNeed:
    phase: int
    iterations: tuple[int, int]
    source: str
    max_skip: int | None
    name: str        # shard set path under the root
    clips: int       # clips the phase streams from this set
    make: int        # clips to generate (clips x fraction, at least one per video)
    bytes: int


def set_name(source: str, max_skip: int | None) -> str:
    """The shard set naming the trainer relies on."""
    return source if max_skip is None else f"{source}/skip{max_skip}"


def plan_stage(stage, gpus: int, clips_fraction: float = 1.0,
               bytes_per_clip: dict[str, int] | None = None) -> list[SetNeed]:
    """Per phase and source: the shard set, its clip count and estimated bytes."""
    if gpus < 1 or not 0 < clips_fraction <= 1:
        raise ValueError("gpus must be >= 1 and clips_fraction in (0, 1]")
    sizes = {**BYTES_PER_CLIP, **(bytes_per_clip or {})}
    weighted = {s: w * SOURCE_ITEMS[s] for s, w in stage.sources.items()}
    total_weight = sum(weighted.values())
    needs = []
    for index, phase in enumerate(stage.phases):
        start, end = stage.phase_start_iteration(index), stage.phase_end_iteration(index)
        phase_clips = (end - start) * stage.batch_size * gpus
        for source, weight in stage.sources.items():
            # one epoch of the mix = sum over sets of weight x set size
            clips = math.ceil(phase_clips * SOURCE_ITEMS[source] / total_weight)
            make = max(math.ceil(clips * clips_fraction), min(clips, SOURCE_ITEMS[source]))
            needs.append(SetNeed(index, (start, end), source, phase.max_skip,
                                 set_name(source, phase.max_skip), clips * int(weight), make,
                                 make * sizes[source]))
    return needs


def per_set(needs: list[SetNeed]) -> dict[str, int]:
    """Clips to generate per shard set: a set used by several phases (skip 5 opens and
    closes the curriculum) gets the sum, so no phase repeats another's clips."""
    totals: dict[str, int] = {}
    for need in needs:
        totals[need.name] = totals.get(need.name, 0) + need.make
    return totals


def format_plan(stage, gpus: int, needs: list[SetNeed], root: str, bytes_per_clip=None) -> str:
    sizes = {**BYTES_PER_CLIP, **(bytes_per_clip or {})}
    lines = [f"stage {stage.stage}: {stage.iterations} iterations x batch {stage.batch_size} "
             f"x {gpus} GPU(s)"]
    for need in needs:
        lo, hi = need.iterations
        skip = "static" if need.max_skip is None else f"max skip {need.max_skip}"
        lines.append(f"  phase {need.phase} [{lo}, {hi}) {skip:12s} {root}/{need.name}: "
                     f"streams {need.clips:,} clips, make {need.make:,} "
                     f"(~{need.bytes / 1e9:.1f} GB)")
    lines.append("shard sets to make (phases sharing a set get the sum):")
    total = 0
    for name, clips in per_set(needs).items():
        source = name.split("/")[0]
        size = clips * sizes[source]
        total += size
        skip = f" --max-skip {name.split('skip')[1]}" if "/skip" in name else ""
        extra = (f"  (from archives: --clips-per-video "
                 f"{math.ceil(clips / SOURCE_ITEMS['bl30k'])})" if source == "bl30k" else "")
        lines.append(f"  tools/make_shards {source} SRC --out {root}/{name}{skip} --clips {clips}"
                     f"   # ~{size / 1e9:.1f} GB{extra}")
    lines.append(f"total ~{total / 1e9:.1f} GB at "
                 + ", ".join(f"{s} {b / 1e3:.0f} KB" for s, b in sizes.items()) + " per clip")
    return "\n".join(lines)
