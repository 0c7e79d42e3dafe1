"""Which clips of its shard sets each skip phase reads, and whether they are enough.

Every clip a stage consumes is distinct by default (the published loader draws a fresh clip
every time it uses a sample):
  - a phase streams each clip of its sets once per loader epoch (weight 1; DAVIS x5 is five
    times as many DAVIS clips, made so by `tools/make_shards plan`);
  - phases that share a set (the two max-skip-5 phases of stages 1-3) read disjoint ranges of
    it: the set is split among them in proportion to their iterations, in phase order. The
    split depends only on the stage record and the set's size, never on the GPU count, so it
    is the same after a resume and after an elastic resume;
  - a phase fits when its range holds at least the clips it still streams: (iterations left)
    x batch x world size, plus what the loader already delivered. The trainer checks that
    when it opens a phase (exactly, with the loader's position) and, for the phases still to
    come, at start; more GPUs than the sets were planned for (`tools/make_shards plan
    --gpus`) need more clips. Without `allow_repeats` a phase that does not fit is an error.

Pure functions of the stage, the sets and their sizes: no I/O here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence


class NotEnoughClipsError(ValueError):
    """A phase would stream a clip more than once and repeats are not allowed."""


@dataclass(frozen=True)
class SetRange:
    """The part [start, stop) of a shard set (in manifest order) that one phase reads."""
    url: str
    weight: float   # loader visits per clip per epoch (1: each clip once)
    start: int
    stop: int
    total: int      # clips in the whole set

    @property
    def clips(self) -> int:
        return self.stop - self.start


def set_range(stage, sets_by_phase: Sequence[Mapping[str, float]], phase: int, url: str,
              total: int) -> tuple[int, int]:
    """[start, stop) of set `url` (`total` clips) read by `phase`: the set split among the
    phases that use it in proportion to their iterations, in phase order."""
    users = [p for p, sets in enumerate(sets_by_phase) if url in sets]
    if phase not in users:
        raise ValueError(f"phase {phase} does not read {url}")
    return stage.set_range(users, phase, total)


def phase_ranges(stage, sets_by_phase: Sequence[Mapping[str, float]], phase: int,
                 totals: Mapping[str, int]) -> list[SetRange]:
    """The sets of `phase` with the range each reads (totals: set URL -> clips)."""
    return [SetRange(url, float(weight), *set_range(stage, sets_by_phase, phase, url, totals[url]),
                     totals[url])
            for url, weight in sets_by_phase[phase].items()]


@dataclass(frozen=True)
class PhaseClips:
    """What phase `phase` streams from iteration `start` to `end` and what its ranges hold."""
    phase: int
    start: int
    end: int
    batch: int        # per process
    world_size: int
    sets: tuple[SetRange, ...]
    delivered: int = 0  # clips the loader already delivered in this phase (a resume)

    @property
    def streamed(self) -> int:
        """Clips the phase streams from `start` on: iterations x batch x world size."""
        return (self.end - self.start) * self.batch * self.world_size

    @property
    def positions(self) -> float:
        """Clips one loader epoch of the ranges holds (weight x range clips)."""
        return sum(s.weight * s.clips for s in self.sets)

    @property
    def distinct(self) -> int:
        return sum(s.clips for s in self.sets)

    @property
    def fits(self) -> bool:
        """Whether no clip is streamed twice: weights at most 1, and the rest of the phase
        within one epoch of its ranges (whole batches of world x batch clips)."""
        step = self.batch * self.world_size
        batches = int(self.positions + 1e-9) // step if step else 0
        return all(s.weight <= 1 for s in self.sets) and \
            (self.delivered + self.streamed) <= batches * step

    def times_streamed(self) -> float:
        """Mean times each clip of the ranges is streamed over the whole phase."""
        return (self.delivered + self.streamed) / self.distinct if self.distinct else math.inf

    def shares(self) -> dict[str, float]:
        """Set URL -> its share of the clips the phase streams."""
        return {s.url: s.weight * s.clips / self.positions if self.positions else 0.0
                for s in self.sets}

    def describe(self) -> str:
        shares = self.shares()
        sets = "; ".join(f"{s.url} clips [{s.start}, {s.stop}) of {s.total} x{s.weight:g} "
                         f"({shares[s.url]:.0%})" for s in self.sets)
        times = self.times_streamed()
        repeat = ("each clip once" if self.fits else f"each clip ~{times:.2f} times")
        before = f" (+{self.delivered:,} streamed before)" if self.delivered else ""
        return (f"phase {self.phase} [{self.start}, {self.end}) streams {self.streamed:,} clips"
                f"{before} from {self.distinct:,} ({repeat}): {sets}")

    def problem(self) -> str | None:
        """Why the phase would repeat clips, with the fixes; None when it fits."""
        if self.fits:
            return None
        heavy = [s.url for s in self.sets if s.weight > 1]
        if heavy:
            why = f"weight > 1 streams every clip of {', '.join(heavy)} more than once"
        else:
            why = (f"{(self.end - self.start):,} iterations x batch {self.batch} x "
                   f"{self.world_size} process(es) = {self.streamed:,} clips"
                   + (f" after the {self.delivered:,} already streamed" if self.delivered else "")
                   + f", but its ranges hold {self.distinct:,}")
        return (f"phase {self.phase} would stream each clip ~{self.times_streamed():.2f} times "
                f"({why}); make the sets with the counts `tools/make_shards plan --stage N "
                "--gpus G` prints (G: the most GPUs the stage will run on), or pass "
                "--allow-repeats")


def phase_clips(stage, sets_by_phase: Sequence[Mapping[str, float]], phase: int,
                totals: Mapping[str, int], world_size: int, from_iteration: int | None = None,
                delivered: int = 0) -> PhaseClips:
    """PhaseClips of `phase` from `from_iteration` (default: its start) to its end."""
    start = stage.phase_start_iteration(phase)
    if from_iteration is not None:
        start = max(start, from_iteration)
    return PhaseClips(phase, start, stage.phase_end_iteration(phase), stage.batch_size,
                      world_size, tuple(phase_ranges(stage, sets_by_phase, phase, totals)),
                      delivered)


def check_phase_clips(stage, sets_by_phase: Sequence[Mapping[str, float]],
                      totals: Mapping[str, int], world_size: int, from_iteration: int = 0,
                      allow_repeats: bool = False) -> list[PhaseClips]:
    """The check "the sets have enough clips for their phases", for a pre-flight: the
    PhaseClips of every phase not finished at `from_iteration` (from there on), and
    NotEnoughClipsError naming every phase that would repeat clips unless `allow_repeats`.
    No loader position is known here: the iterations of a phase in progress before
    `from_iteration` count as streamed at this world size (the trainer counts them exactly
    from the loader's position when it opens the phase)."""
    out = []
    for phase in range(len(stage.phases)):
        if stage.phase_end_iteration(phase) <= from_iteration or \
                stage.phase_end_iteration(phase) == stage.phase_start_iteration(phase):
            continue
        begun = max(0, from_iteration - stage.phase_start_iteration(phase))
        out.append(phase_clips(stage, sets_by_phase, phase, totals, world_size, from_iteration,
                               delivered=begun * stage.batch_size * world_size))
    problems = [p.problem() for p in out if p.problem()]
    if problems and not allow_repeats:
        raise NotEnoughClipsError("; ".join(problems))
    return out


__all__ = ["NotEnoughClipsError", "SetRange", "PhaseClips", "set_range",
           "phase_ranges", "phase_clips", "check_phase_clips"]
