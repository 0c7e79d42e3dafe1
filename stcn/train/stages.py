"""The four STCN training stages as data: published defaults in one place, overridable.

A stage says how long to train, at which batch size and learning rate, which shard sets to
stream, and how the frame-distance (max skip) curriculum moves. As published, the curriculum
switches at fractions of the run, while the learning-rate steps and the bootstrapped-CE ramp
are absolute iterations. With another iteration count, `schedule_scaling` says what happens
to those absolute milestones (`SCHEDULE_SCALINGS`): "proportional" (the default) scales them
with the run, so a 200-iteration test run goes through the published schedule's shape;
"absolute" keeps them at the published iterations (a milestone past the end never happens).
`describe_schedule` is what the trainer prints at start and `--dry-run` shows.

Shard sets follow the pipeline's naming: `<root>/static` for stage 0 and
`<root>/<source>/skip<S>` for the video sources, S being the curriculum's max skip (the
YouTubeVOS sets already divide their gap by 5 when they are made). A phase may instead
name its shard sets explicitly (`sets`), e.g. from a YAML override file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

#: How the absolute milestones (lr steps, bootstrap ramp) follow another --iterations.
SCHEDULE_SCALINGS = ("proportional", "absolute")
DEFAULT_SCHEDULE_SCALING = "proportional"


@dataclass(frozen=True)
class SkipPhase:
    """One step of the max-skip curriculum.

    start: fraction of the stage's iterations at which this phase begins (0 for the first).
    max_skip: the curriculum's largest frame gap, or None for static image stages.
    sets: explicit shard set URL -> sampling weight; None derives them from the shard root.
    """

    start: float
    max_skip: int | None
    sets: Mapping[str, float] | None = None


@dataclass(frozen=True)
class StageConfig:
    """Everything that defines one training stage. Iteration counts are absolute."""

    stage: int
    iterations: int
    batch_size: int  # per GPU (per process)
    lr: float
    lr_steps: tuple[int, ...]  # iterations at which lr is multiplied by lr_gamma
    single_object: bool
    # source name -> mix weight per video (DAVIS x5 + YouTubeVOS x1): `tools/make_shards plan`
    # makes w x videos clips per source in proportion, the loader streams each once
    sources: Mapping[str, float]
    phases: tuple[SkipPhase, ...]
    lr_gamma: float = 0.1
    weight_decay: float = 1e-7
    bootstrap_start: int = 20_000  # plain CE before this iteration
    bootstrap_end: int = 70_000  # kept fraction reaches bootstrap_final_fraction here
    bootstrap_final_fraction: float = 0.15
    # How lr_steps and bootstrap_* follow a changed iteration count (see module docstring).
    schedule_scaling: str = DEFAULT_SCHEDULE_SCALING

    def __post_init__(self) -> None:
        if self.schedule_scaling not in SCHEDULE_SCALINGS:
            raise ValueError(f"schedule_scaling must be one of {SCHEDULE_SCALINGS}, "
                             f"got {self.schedule_scaling!r}")
        if self.iterations <= 0 or self.batch_size <= 0 or self.lr <= 0:
            raise ValueError(f"stage {self.stage}: iterations, batch_size and lr must be positive")
        if not self.phases or self.phases[0].start != 0:
            raise ValueError(f"stage {self.stage}: the first skip phase must start at 0")
        starts = [p.start for p in self.phases]
        if starts != sorted(starts) or starts[-1] >= 1:
            raise ValueError(f"stage {self.stage}: phase starts must increase within [0, 1): {starts}")
        if not 0 < self.bootstrap_final_fraction <= 1:
            raise ValueError("bootstrap_final_fraction must be in (0, 1]")
        if self.bootstrap_end < self.bootstrap_start:
            raise ValueError("bootstrap_end must not come before bootstrap_start")

    def with_iterations(self, iterations: int) -> "StageConfig":
        """The same stage over `iterations`. Phases are fractions, so they follow; the lr
        steps and the bootstrap ramp follow `schedule_scaling`."""
        if self.schedule_scaling == "absolute":
            return dataclasses.replace(self, iterations=iterations)
        scale = iterations / self.iterations
        return dataclasses.replace(
            self,
            iterations=iterations,
            lr_steps=tuple(round(s * scale) for s in self.lr_steps),
            bootstrap_start=round(self.bootstrap_start * scale),
            bootstrap_end=round(self.bootstrap_end * scale),
        )

    def phase_index(self, iteration: int) -> int:
        """Index of the skip phase that iteration `iteration` (0-based) belongs to."""
        index = 0
        for i, phase in enumerate(self.phases):
            if iteration >= round(phase.start * self.iterations):
                index = i
        return index

    def phase_start_iteration(self, index: int) -> int:
        return round(self.phases[index].start * self.iterations)

    def phase_end_iteration(self, index: int) -> int:
        if index + 1 < len(self.phases):
            return self.phase_start_iteration(index + 1)
        return self.iterations

    def set_range(self, users: list[int], index: int, total: int) -> tuple[int, int]:
        """[start, stop) of a set of `total` clips that phase `index` reads when the phases
        `users` share it: split in proportion to their iterations, in phase order (disjoint,
        and independent of the GPU count; stcn.train.clip_ranges, tools/make_shards plan)."""
        lengths = {p: self.phase_end_iteration(p) - self.phase_start_iteration(p) for p in users}
        whole = sum(lengths.values())
        if whole == 0:
            return 0, total
        before = sum(n for p, n in lengths.items() if p < index)
        return total * before // whole, total * (before + lengths[index]) // whole

    def shard_sets(self, index: int, root: str | None) -> dict[str, float]:
        """Shard set URL -> loader weight for phase `index`: explicit sets, else derived from
        `root` with weight 1: each clip is streamed once, and the mix of `sources` (DAVIS x5)
        is in the set sizes `tools/make_shards plan` gives (stcn.train.clip_ranges)."""
        phase = self.phases[index]
        if phase.sets is not None:
            return dict(phase.sets)
        if root is None:
            raise ValueError(
                f"stage {self.stage} phase {index} names no shard sets: pass a shard root "
                "(--shards ROOT) or give the phase explicit `sets` in the stage config"
            )
        root = root.rstrip("/")
        if phase.max_skip is None:
            return {f"{root}/{source}": 1.0 for source in self.sources}
        return {f"{root}/{source}/skip{phase.max_skip}": 1.0 for source in self.sources}

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _video_phases(last_switch: float) -> tuple[SkipPhase, ...]:
    # Published curriculum: 5, 10, 15, 20, 25, then back to 5 for the final stretch.
    skips = (5, 10, 15, 20, 25, 5)
    starts = (0.0, 0.1, 0.2, 0.3, 0.4, last_switch)
    return tuple(SkipPhase(start=s, max_skip=k) for s, k in zip(starts, skips))


#: Published defaults (STCN_FACTS.md, "Training").
STAGES: dict[int, StageConfig] = {
    0: StageConfig(
        stage=0, iterations=300_000, batch_size=8, lr=1e-5, lr_steps=(150_000,),
        single_object=True, sources={"static": 1.0}, phases=(SkipPhase(0.0, None),),
    ),
    1: StageConfig(
        stage=1, iterations=500_000, batch_size=4, lr=1e-5, lr_steps=(400_000,),
        single_object=False, sources={"bl30k": 1.0}, phases=_video_phases(0.8),
    ),
    2: StageConfig(
        stage=2, iterations=300_000, batch_size=4, lr=1e-5, lr_steps=(250_000,),
        single_object=False, sources={"davis": 5.0, "youtube": 1.0}, phases=_video_phases(0.9),
    ),
    3: StageConfig(
        stage=3, iterations=150_000, batch_size=4, lr=1e-5, lr_steps=(125_000,),
        single_object=False, sources={"davis": 5.0, "youtube": 1.0}, phases=_video_phases(0.9),
    ),
}


def load_stage(stage: int, override: str | Path | Mapping[str, Any] | None = None) -> StageConfig:
    """The published stage `stage`, with fields replaced from a YAML file or a mapping.

    Override keys are StageConfig field names. `phases` is a list of
    {start, max_skip, sets} mappings; `lr_steps` a list of iterations. When `iterations`
    is overridden and `lr_steps`/`bootstrap_*` are not, those milestones follow
    `schedule_scaling` (scaled with the run, or kept at the published iterations).
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage}: expected one of {sorted(STAGES)}")
    config = STAGES[stage]
    if override is None:
        return config
    if not isinstance(override, Mapping):
        path = Path(override)
        try:
            override = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise FileNotFoundError(f"stage config {path} does not exist") from None
        if not isinstance(override, Mapping):
            raise ValueError(f"stage config {path} must hold a mapping of StageConfig fields")
    override = dict(override)
    known = {f.name for f in dataclasses.fields(StageConfig)}
    unknown = set(override) - known
    if unknown:
        raise ValueError(f"unknown stage config keys {sorted(unknown)}: expected some of {sorted(known)}")
    if override.get("stage", stage) != stage:
        raise ValueError(f"stage config is for stage {override['stage']}, not stage {stage}")
    if "schedule_scaling" in override:
        config = dataclasses.replace(config, schedule_scaling=override.pop("schedule_scaling"))
    if "iterations" in override:
        config = config.with_iterations(int(override.pop("iterations")))
    if "phases" in override:
        override["phases"] = tuple(
            SkipPhase(start=float(p["start"]), max_skip=p.get("max_skip"), sets=p.get("sets"))
            for p in override["phases"]
        )
    if "lr_steps" in override:
        override["lr_steps"] = tuple(int(s) for s in override["lr_steps"])
    return dataclasses.replace(config, **override)


def resolve_stage(stage: int, config_file: str | Path | None = None, **overrides: Any) -> StageConfig:
    """The published stage, then a YAML override file, then command-line overrides (None = unset)."""
    merged: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise FileNotFoundError(f"stage config {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, Mapping):
            raise ValueError(f"stage config {path} must hold a mapping of StageConfig fields")
        merged.update(loaded)
    merged.update({k: v for k, v in overrides.items() if v is not None})
    return load_stage(stage, merged or None)


def describe_schedule(stage: StageConfig) -> str:
    """The schedule in words, against the published one: printed at start and by --dry-run."""
    published = STAGES[stage.stage]
    lines = [f"stage {stage.stage}: {stage.iterations} iterations (published {published.iterations}), "
             f"batch {stage.batch_size} per GPU, lr {stage.lr:g}"]
    if stage.iterations != published.iterations:
        lines.append(f"  schedule scaling: {stage.schedule_scaling} (lr steps and bootstrap ramp "
                     + ("scaled with the iterations)" if stage.schedule_scaling == "proportional"
                        else "kept at the published iterations)"))
    steps = ", ".join(str(s) for s in stage.lr_steps) or "none"
    lines.append(f"  lr x{stage.lr_gamma:g} at iteration {steps} (published "
                 f"{', '.join(str(s) for s in published.lr_steps)})"
                 + "".join(f"; {s} is past the end" for s in stage.lr_steps if s >= stage.iterations))
    lines.append(f"  bootstrapped CE: all pixels up to iteration {stage.bootstrap_start}, then linearly "
                 f"down to the hardest {stage.bootstrap_final_fraction:.0%} at {stage.bootstrap_end} "
                 f"(published {published.bootstrap_start}-{published.bootstrap_end})")
    for index, phase in enumerate(stage.phases):
        skip = "static" if phase.max_skip is None else f"max skip {phase.max_skip}"
        lines.append(f"  phase {index}: iterations [{stage.phase_start_iteration(index)}, "
                     f"{stage.phase_end_iteration(index)}) {skip} (from {phase.start:.0%} of the run)")
    return "\n".join(lines)


def _plain(value: Any) -> Any:
    """Tuples and mappings as lists and dicts, so configs round-trip through YAML/JSON."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


__all__ = ["SkipPhase", "StageConfig", "STAGES", "SCHEDULE_SCALINGS", "DEFAULT_SCHEDULE_SCALING",
           "load_stage", "resolve_stage", "describe_schedule"]
