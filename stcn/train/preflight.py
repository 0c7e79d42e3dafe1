"""Pre-flight: everything a stage needs, checked before anything is written.

`check_run(stage, options, world_size)` reads the manifest of every shard set of every
phase (not only the first: a stage-3 run must not die at its phase switch hours in) and
returns a `RunPlan`: per phase its iterations, sets, clips streamed and available, and how
many times each clip is streamed, plus every problem found:
  - a set is missing, or its manifest does not read (bad JSON, an older format version);
  - its source kind (manifest config "source") or max skip is not the phase's;
  - the sets of one phase disagree on the online augmentation left to the trainer;
  - it holds fewer clips than the stage streams from it (phases sharing a set, like the two
    max-skip-5 phases, count together), unless repeats are allowed;
  - stage 0 would start from random weights without --from-scratch; a weights file is missing.
`RunPlan.raise_if_problems()` raises one `PreflightError` listing them all, with the
`tools/make_shards` command for each missing set. `--dry-run` prints `RunPlan.format()`.

Clip counts come from `stcn.train.clip_ranges` (the one home of that rule): phases sharing a set
read disjoint ranges of it, and a phase fits when its range holds every clip it streams. A
resumed run is checked from its newest checkpoint's iteration on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from stcn.train.checkpoint import CHECKPOINT_PATTERN, CheckpointManager
from stcn.train.clip_ranges import PhaseClips, check_phase_clips
from stcn.train.stages import StageConfig

#: How `tools/make_shards` names each source's subcommand (the stage's source names).
MAKE_SHARDS = "tools/make_shards"


class PreflightError(ValueError):
    """The run cannot start; the message lists every problem found."""


@dataclass
class SetPlan:
    url: str
    weight: float
    source: str | None  # expected source kind; None: any source of the stage
    max_skip: int | None  # expected max skip (sets derived from the shard root); None: unchecked
    available: int | None = None  # clips in the set; None when its manifest does not read
    missing: bool = False
    config: dict = field(default_factory=dict)


@dataclass
class PhasePlan:
    index: int
    start: int
    end: int
    max_skip: int | None
    sets: list[SetPlan]
    clips: PhaseClips | None = None  # ranges, streamed and repeats; None: finished or sets unreadable


@dataclass
class RunPlan:
    stage: StageConfig
    world_size: int
    phases: list[PhasePlan]
    problems: list[str]
    commands: list[str]  # tools/make_shards commands for the missing sets
    allow_repeats: bool
    from_iteration: int = 0  # where the run resumes (newest checkpoint), 0 for a fresh run

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        """The phase plan: iterations, sets, clips streamed and available, repeats."""
        lines = [f"phase plan ({self.world_size} process(es) x batch {self.stage.batch_size}"
                 f"{', repeats allowed' if self.allow_repeats else ''}):"]
        for phase in self.phases:
            skip = "static" if phase.max_skip is None else f"max skip {phase.max_skip}"
            head = f"  phase {phase.index}: iterations [{phase.start}, {phase.end}) {skip}"
            clips = phase.clips
            if clips is not None:
                times = clips.times_streamed()
                head += (f", streams {clips.delivered + clips.streamed:,} clips from {clips.distinct:,}: "
                         + ("each clip once" if clips.fits else f"each clip ~{times:.2f} times"))
                if clips.start > phase.start:
                    head += f" (resumed at {clips.start})"
            elif phase.end == phase.start:
                head += ", no iterations"
            elif phase.end <= self.from_iteration:
                head += ", done"
            lines.append(head)
            ranges = {r.url: r for r in clips.sets} if clips is not None else {}
            shares = clips.shares() if clips is not None else {}
            for s in phase.sets:
                if s.missing:
                    have = "missing"
                elif s.available is None:
                    have = "unreadable"
                elif s.url in ranges:
                    r = ranges[s.url]
                    streams = shares[s.url] * (clips.delivered + clips.streamed)
                    have = (f"streams {streams:,.0f} clips ({shares[s.url]:.0%}), reads clips "
                            f"[{r.start}, {r.stop}) of {r.total:,}")
                else:
                    have = f"{s.available:,} clips"
                lines.append(f"    {s.url} x{s.weight:g}: {have}")
        if self.problems:
            lines.append(self.message())
        return "\n".join(lines)

    def message(self) -> str:
        lines = [f"pre-flight found {len(self.problems)} problem(s); nothing was written:"]
        lines += [f"  - {p}" for p in self.problems]
        if self.commands:
            lines.append("make the missing shard sets with (SRC: the raw data set's directory; "
                         "`tools/make_shards plan` sizes all sets of a stage):")
            lines += [f"  {c}" for c in self.commands]
        return "\n".join(lines)

    def raise_if_problems(self) -> None:
        if self.problems:
            raise PreflightError(self.message())


def phase_set_plans(stage: StageConfig, index: int, root: str | None,
                    explicit: Mapping[str, float] | None) -> list[SetPlan]:
    """The sets of phase `index` with what each must be: explicit sets (every phase) or
    the phase's own `sets` are checked for a source of the stage; sets derived from the
    shard root for their source and max skip as well."""
    phase = stage.phases[index]
    if explicit:
        return [SetPlan(url, float(w), None, None) for url, w in explicit.items()]
    if phase.sets is not None:
        return [SetPlan(url, float(w), None, None) for url, w in phase.sets.items()]
    sets = stage.shard_sets(index, root)
    return [SetPlan(url, float(w), source, phase.max_skip)
            for (url, w), source in zip(sets.items(), stage.sources)]


def _read_set(plan: SetPlan, stage: StageConfig, problems: list[str]) -> None:
    import shards
    from shards import storage

    try:
        manifest = shards.read_manifest(plan.url)
    except shards.ManifestError as error:
        try:
            present = storage.exists(shards.manifest.manifest_url(plan.url))
        except Exception:  # an unreachable store: report the read error itself
            present = True
        plan.missing = not present
        problems.append(f"{plan.url}: missing (no manifest.json)" if plan.missing else str(error))
        return
    except Exception as error:  # storage errors (permissions, network) are problems too
        problems.append(f"{plan.url}: cannot read its manifest ({type(error).__name__}: {error})")
        return
    plan.available = manifest.num_samples
    plan.config = manifest.config or {}
    source = plan.config.get("source")
    allowed = [plan.source] if plan.source else list(stage.sources)
    if source not in allowed:
        found = f"source kind {source!r}" if source else "no source kind (not made by tools/make_shards)"
        problems.append(f"{plan.url}: holds {found}, stage {stage.stage} expects "
                        + " or ".join(repr(a) for a in allowed))
    if plan.max_skip is not None and plan.config.get("max_skip") != plan.max_skip:
        problems.append(f"{plan.url}: made with max skip {plan.config.get('max_skip')}, "
                        f"its phase needs {plan.max_skip}")
    if plan.available == 0:
        problems.append(f"{plan.url}: holds no clips")


def _make_command(plan: SetPlan, stage: StageConfig, clips: int | None) -> str:
    only = next(iter(stage.sources)) if len(stage.sources) == 1 else None
    source = plan.source or only or "|".join(stage.sources)
    if plan.max_skip is not None:
        skip = f" --max-skip {plan.max_skip}"
    else:  # an explicit set: its phase's skip is not known here
        skip = "" if stage.phases[0].max_skip is None else " --max-skip S"
    return f"{MAKE_SHARDS} {source} SRC --out {plan.url}{skip} --clips {clips if clips else 'N'}"


def _weights_problems(stage: StageConfig, options: Any) -> list[str]:
    problems = []
    for flag, path in (("--load-network", options.load_network),
                       ("--imagenet-resnet50", options.imagenet_resnet50),
                       ("--imagenet-resnet18", options.imagenet_resnet18)):
        if path and not Path(path).is_file():
            problems.append(f"{flag} {path}: no such file")
    resuming = bool(options.resume) and (
        options.resume != "auto" or CheckpointManager(options.run_dir).checkpoints())
    if stage.stage == 0 and not (options.load_network or options.from_scratch or resuming):
        missing = [flag for flag, path in (("--imagenet-resnet50", options.imagenet_resnet50),
                                           ("--imagenet-resnet18", options.imagenet_resnet18)) if not path]
        if missing:
            problems.append(
                "stage 0 starts from ImageNet weights, as published: pass "
                + " and ".join(f"{m} FILE" for m in missing)
                + " (torchvision ResNet-50 / ResNet-18 .pth files), or --from-scratch to train "
                  "from random weights")
    return problems


def resume_iteration(options: Any) -> int:
    """The iteration a run continues from, read from checkpoint file names (no loading)."""
    if not options.resume:
        return 0
    if options.resume == "auto":
        found = CheckpointManager(options.run_dir).checkpoints()
        return found[-1][0] if found else 0
    match = CHECKPOINT_PATTERN.match(Path(options.resume).name)
    return int(match.group(1)) if match else 0


def check_run(stage: StageConfig, options: Any, world_size: int,
              make_clips: Mapping[str, int] | None = None) -> RunPlan:
    """Check every set of every phase and the starting weights (see the module docstring).

    options: a TrainOptions (shards, shard_sets, weights, resume, allow_repeats, ...).
    make_clips: shard set URL -> clips `tools/make_shards plan` would make, for the commands.
    """
    problems = _weights_problems(stage, options)
    allow_repeats = bool(getattr(options, "allow_repeats", False))
    plan = RunPlan(stage, world_size, [], problems, [], allow_repeats, resume_iteration(options))
    read: dict[str, SetPlan] = {}
    for index in range(len(stage.phases)):
        try:
            sets = phase_set_plans(stage, index, options.shards, options.shard_sets)
        except ValueError as error:
            problems.append(str(error))
            sets = []
        for s in sets:
            if s.url not in read:
                _read_set(s, stage, problems)
                read[s.url] = s
            else:  # read once; this phase's copy shares what was found
                first = read[s.url]
                s.available, s.missing, s.config = first.available, first.missing, first.config
        phase = PhasePlan(index, stage.phase_start_iteration(index), stage.phase_end_iteration(index),
                          stage.phases[index].max_skip, sets)
        _check_online(phase, problems)
        plan.phases.append(phase)

    # Clip counts where the sizes are known; a phase with an unreadable set is reported above.
    totals = {url: s.available for url, s in read.items() if s.available}
    known = [{s.url: s.weight for s in phase.sets if s.url in totals} for phase in plan.phases]
    complete = {phase.index for phase in plan.phases
                if phase.sets and all(s.url in totals for s in phase.sets)}
    for clips in check_phase_clips(stage, known, totals, world_size, plan.from_iteration,
                                   allow_repeats=True):
        if clips.phase in complete:
            plan.phases[clips.phase].clips = clips
            problem = clips.problem()
            if problem and not allow_repeats:
                problems.append(problem)
    for s in read.values():
        if s.missing:
            plan.commands.append(_make_command(s, stage, (make_clips or {}).get(s.url)))
    return plan


def _check_online(phase: PhasePlan, problems: list[str]) -> None:
    specs = {s.url: json.dumps(s.config.get("online", []), sort_keys=True)
             for s in phase.sets if s.available is not None}
    if len(set(specs.values())) > 1:
        problems.append(f"phase {phase.index}: its shard sets disagree on the online augmentation "
                        f"left to the trainer ({', '.join(specs)}); make them with the same pipeline")


__all__ = ["PreflightError", "RunPlan", "PhasePlan", "SetPlan", "check_run", "phase_set_plans",
           "resume_iteration"]
