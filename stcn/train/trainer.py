"""The STCN training loop: one stage over streamed shard sets, DDP, AMP, exact resume.

`train(stage, options)` runs (or continues) one stage in `options.run_dir`:
  - the network is built for the stage (single- or multi-object), then initialised from
    `--load-network` (stage-0 weights are widened) or ImageNet files, or resumed;
  - every skip phase of the stage streams its own shard sets; the loader is rebuilt when
    the curriculum moves, and its position is part of every checkpoint;
  - each clip: frame 0's ground truth of a target object (and a second one, if any) goes in,
    frames 1 and 2 are predicted, the loss is bootstrapped CE on both;
  - checkpoints are atomic and hold everything needed to continue bit for bit;
  - SIGTERM/SIGUSR1 finish the current step, checkpoint and return `preempted`.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import json
import math
import os
import re
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch

from stcn.model.precision import AMP_DTYPES
from stcn.model.weights import build_network, save_stcn_weights
from stcn.train import clip_ranges, distributed
from stcn.train.checkpoint import (
    CheckpointManager,
    capture_rng_states,
    restore_rng_states,
    unwrap_model,
)
from stcn.train.clip_ranges import PhaseClips
from stcn.train.losses import bootstrap_fraction, bootstrapped_cross_entropy, mask_iou
from stcn.train.monitor import StepTimer, TrainingMonitor, gpu_memory_gib
from stcn.train.online_augment import CROP_MODES, OnlineAugmentation, prepare_batch
from stcn.train.preflight import RunPlan, check_run
from stcn.train.runrecord import rank_log, resolved_config, write_config, write_summary
from stcn.train.seeding import loader_seed, rank_streams, seed_globals
from stcn.train.stages import StageConfig, describe_schedule

#: Exit status meaning "checkpointed on a preemption signal, run me again" (EX_TEMPFAIL).
PREEMPTED_EXIT_CODE = 75
#: Exit status after a checkpoint on Ctrl-C (128 + SIGINT, the shells' convention).
INTERRUPTED_EXIT_CODE = 130
#: Steps over which --max-nonfinite is counted.
NONFINITE_WINDOW = 100
# A stage whose clips have no target object (all-background masks) more often than this
# learns mostly "background": warn, with the share (once a few batches were seen).
EMPTY_CLIP_WARN_SHARE = 0.25
EMPTY_CLIP_MIN_SEEN = 16
NAN_POLICIES = ("skip", "stop")
AMP_MODES = ("fp16", "bf16", "off")


@dataclass
class TrainOptions:
    """Run-level settings (the stage itself is a `StageConfig`). Defaults in one place."""

    run_dir: str
    shards: str | None = None  # shard root; each phase's sets are derived from it
    shard_sets: Mapping[str, float] | None = None  # explicit URL -> weight, used by every phase
    load_network: str | None = None  # STCN weights to start from (stage 0 widened)
    imagenet_resnet50: str | None = None  # torchvision-layout files, when not loading STCN
    imagenet_resnet18: str | None = None
    from_scratch: bool = False  # allow stage 0 to start from random weights (no ImageNet files)
    resume: str | None = "auto"  # "auto", a checkpoint path, or None for a fresh run
    device: str | None = None  # "cuda", "cuda:N", "cpu", or "auto"/None (CUDA when available)
    amp: str = "fp16"  # AMP_MODES: fp16 + GradScaler as published, bf16, or off; CPU runs fp32
    compile: bool = False
    channels_last: bool = False
    crop: int | None = None  # reduce clips to crop x crop on the device (fast CPU runs)
    crop_mode: str = "random"
    workers: int = 4
    seed: int = 42
    deterministic: bool = False  # torch.use_deterministic_algorithms (bitwise resume)
    checkpoint_every: int = 1000
    keep_last: int = 3
    snapshot_every: int = 50_000
    log_every: int = 50
    image_every: int = 1000
    nan_policy: str = "skip"
    max_nonfinite: int = 10  # skipped non-finite steps allowed among the last NONFINITE_WINDOW
    stop_after: int | None = None  # checkpoint and return after this many total iterations
    progress: bool = True
    allow_repeats: bool = False  # let the stage stream a clip more than once (sets short of clips)
    rank_logs: bool = True  # tee each rank's console output into run_dir/rank<N>.log
    prefetch: int = 2  # remote shards each loader worker fetches ahead (shards.fetch)
    cache_dir: str | None = None  # node-local cache of remote shards (shards.cache)
    cache_limit: str | int | None = None  # its bound, bytes or e.g. "20GB"

    def __post_init__(self) -> None:
        if isinstance(self.amp, bool):  # the former on/off switch
            self.amp = "fp16" if self.amp else "off"
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        if self.nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {self.nan_policy!r}")
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode must be one of {CROP_MODES}, got {self.crop_mode!r}")
        if self.crop is not None and self.crop % 16:
            raise ValueError(f"crop {self.crop} must be a multiple of 16 (the network's stride)")
        for name in ("checkpoint_every", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        from shards.cache import parse_size
        from shards.fetch import FetchOptions

        # bad --prefetch/--cache-dir/--cache-limit: an error now, not after the network is built
        FetchOptions(self.prefetch, self.cache_dir,
                     parse_size(self.cache_limit) if self.cache_limit is not None else None)


@dataclass
class TrainResult:
    # Why the run ended, recorded in summary.json: "completed", "preempted" (signal),
    # "stopped" (stop_after), "interrupted" or "diverged".
    status: str
    iteration: int
    losses: list[float]  # total loss of every iteration run in this process (rank 0's view)
    weights_path: Path | None = None
    last_metrics: dict[str, float] = dataclasses.field(default_factory=dict)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf and the policy is `stop`."""


# --------------------------------------------------------------------------- data
def open_loader(sets: Mapping[str, float] | Iterable[clip_ranges.SetRange], stage: StageConfig,
                options: TrainOptions, context: distributed.DistributedContext, phase: int):
    """The streaming loader for one skip phase's shard sets (URL -> weight, or the ranges
    the phase reads, stcn.train.clip_ranges), split over ranks and workers."""
    import shards

    return shards.make_loader(
        [shards.ShardSource(url, weight) for url, weight in sets.items()]
        if isinstance(sets, Mapping) else
        [shards.ShardSource(s.url, s.weight, s.start, s.stop) for s in sets],
        batch_size=stage.batch_size,
        rank=context.rank,
        world_size=context.world_size,
        seed=loader_seed(options.seed, stage.stage, phase),
        num_workers=options.workers,
        pin_memory=context.device.type == "cuda",
        prefetch=options.prefetch, cache_dir=options.cache_dir, cache_limit=options.cache_limit,
    )


def parse_shard_arguments(values: list[str] | tuple[str, ...]) -> tuple[str | None, dict[str, float] | None]:
    """`--shards` values -> (root, None) or (None, {set URL: weight}).

    One value that is not itself a shard set (no manifest.json) is a root from which every
    skip phase derives its sets; otherwise each value is a set, `URL` or `URL=WEIGHT`, and
    those sets are streamed in every phase.
    """
    import shards

    if not values:
        return None, None
    sets: dict[str, float] = {}
    for value in values:
        url, separator, weight = value.rpartition("=")
        try:
            sets[url if separator else value] = float(weight) if separator else 1.0
        except ValueError:
            sets[value] = 1.0
    if len(values) == 1 and "=" not in values[0]:
        try:
            shards.read_manifest(values[0])
        except shards.ManifestError:
            return values[0], None
    return None, sets


def online_augmentation_for(sets: Mapping[str, float]) -> OnlineAugmentation:
    """The online steps the pipeline left for the trainer, from the first set's manifest.

    All sets of one phase must agree: a step baked into one source and left online for
    another would be applied twice or never.
    """
    import shards

    specs = {}
    for url in sets:
        config = shards.read_manifest(url).config or {}
        specs[url] = json.dumps(config.get("online", []), sort_keys=True)
    if len(set(specs.values())) > 1:
        raise ValueError(f"shard sets disagree on their online augmentation: {specs}")
    return OnlineAugmentation.from_spec(json.loads(next(iter(specs.values()))) if specs else [])


def select_objects(metas: list[Mapping[str, Any]], rng: np.random.Generator,
                   single_object: bool) -> tuple[list[int], list[int]]:
    """Per clip, a target object id and a second one (-1 when absent) from meta["objects"]."""
    targets, seconds = [], []
    for meta in metas:
        objects = [int(o) for o in meta.get("objects", [])]
        if not objects:
            targets.append(-1)
            seconds.append(-1)
            continue
        order = rng.permutation(len(objects))
        targets.append(objects[order[0]])
        seconds.append(objects[order[1]] if len(objects) > 1 and not single_object else -1)
    return targets, seconds


def clip_targets(masks: torch.Tensor, targets: list[int], seconds: list[int],
                 soft: torch.Tensor | None = None, has_soft: torch.Tensor | None = None
                 ) -> dict[str, torch.Tensor]:
    """Network inputs and CE targets from uint8 id maps (B, 3, H, W).

    first/second: (B, 1, H, W) float masks of frame 0; selector (B, 2);
    classes: (B, 3, H, W) long, 0 background, 1 target, 2 second object.
    soft (float 0..1, (B, 3, H, W)) and has_soft (bool (B,)): the soft masks of static clips
    (single object). As published, such a clip's target is soft > 0.5 and the value
    encoder sees frame 0's soft mask itself.
    """
    ids = masks.long()
    target = torch.tensor(targets, device=masks.device).view(-1, 1, 1, 1)
    second = torch.tensor(seconds, device=masks.device).view(-1, 1, 1, 1)
    is_target = ids == target
    first = is_target[:, :1].float()
    if soft is not None:
        use_soft = (has_soft.to(masks.device).view(-1, 1, 1, 1) & (target >= 0))
        is_target = torch.where(use_soft, soft > 0.5, is_target)
        first = torch.where(use_soft, soft[:, :1].float(), first)
    is_second = (ids == second) & (second >= 0)
    classes = is_target.long() + 2 * is_second.long()
    selector = torch.stack([torch.ones(len(targets)), (torch.tensor(seconds) >= 0).float()], 1)
    return {
        "first": first,
        "second": is_second[:, :1].float(),
        "selector": selector.to(masks.device),
        "classes": classes,
    }


def world_size_from_env() -> int:
    """torchrun's WORLD_SIZE (1 without torchrun), read without touching any device."""
    return int(os.environ.get("WORLD_SIZE") or 1)


# --------------------------------------------------------------------------- model
@dataclass(frozen=True)
class AmpPolicy:
    dtype: torch.dtype | None  # autocast dtype; None runs fp32
    grad_scaler: bool  # loss scaling: fp16 needs it, bf16's range does not

    def describe(self) -> str:
        if self.dtype is None:
            return "off (fp32)"
        scaler = " with a GradScaler" if self.grad_scaler else ""
        return f"{str(self.dtype).removeprefix('torch.')} autocast{scaler}"


def amp_policy(device: torch.device, amp: str) -> AmpPolicy:
    """The published fp16 autocast + GradScaler on CUDA, bf16 on request; CPU runs stay fp32."""
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {AMP_MODES}, got {amp!r}")
    if amp == "off" or device.type != "cuda":
        return AmpPolicy(None, False)
    dtype = AMP_DTYPES[amp]
    return AmpPolicy(dtype, dtype == torch.float16)


def make_optimizer(params: list[torch.nn.Parameter], stage: StageConfig) -> torch.optim.Adam:
    """Adam as published; the fused kernel (same update, far fewer launches) where available."""
    try:
        return torch.optim.Adam(params, lr=stage.lr, weight_decay=stage.weight_decay, fused=True)
    except (RuntimeError, TypeError):  # older torch, or a device without fused kernels
        return torch.optim.Adam(params, lr=stage.lr, weight_decay=stage.weight_decay)


#: MKL's code for its reproducible mode on the SSE2 code path (MKL_CBWR=COMPATIBLE): AUTO,
#: the path chosen for this CPU, still let runs differ (measured).
MKL_CBWR_COMPATIBLE = 3


def reproducible_mkl() -> bool | None:
    """Make torch's MKL give the same sums in every process; whether it could (None: this
    torch has no MKL).

    Two MKL defaults let two processes round the same matrix product differently, and so
    the same training step (seen as a resumed step, or a whole run, differing in the last
    bits now and then): a thread count it may lower by itself (dynamic), and code paths
    chosen per call (e.g. by memory alignment) unless its conditional numerical
    reproducibility is on. torch exposes neither switch, so they are set in torch's own
    library; the second only works before MKL's first product (a fresh process: tools/train)
    and is left alone when the environment sets MKL_CBWR (MKL reads it at start-up)."""
    if not torch.backends.mkl.is_available():
        return None
    library = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    if not library.exists():
        return False
    try:
        mkl = ctypes.CDLL(str(library))
        mkl.MKL_Set_Dynamic(ctypes.c_int(0))  # the C (by value) entry
        if os.environ.get("MKL_CBWR"):
            return True
        return mkl.mkl_serv_cbwr_set(ctypes.c_int(MKL_CBWR_COMPATIBLE)) == 0
    except (OSError, AttributeError):  # another build: MKL linked otherwise
        return False


# --------------------------------------------------------------------------- signals
class StopSignal:
    """Records SIGINT/SIGTERM/SIGUSR1 so the loop can checkpoint after the current step and
    stop. A second SIGINT (Ctrl-C twice) raises KeyboardInterrupt at once: abort, no
    checkpoint. Loader workers ignore all three (shards.stream): the main process decides."""

    SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self.received: str | None = None
        self.names: set[str] = set()
        self._previous: dict[int, Any] = {}

    @property
    def status(self) -> str:
        """"preempted" for a scheduler's SIGTERM/SIGUSR1 (exit 75: requeue me), else
        "interrupted" (Ctrl-C, exit 130)."""
        return "interrupted" if self.names == {"SIGINT"} else "preempted"

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                number = getattr(signal, name, None)
                if number is not None:
                    self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number: int, frame: Any) -> None:
        name = signal.Signals(number).name
        if name == "SIGINT" and "SIGINT" in self.names:
            raise KeyboardInterrupt("second Ctrl-C: aborted without a checkpoint")
        if name == "SIGINT":
            # Straight to the descriptor: a handler that prints may land inside a write to
            # the same buffered stream (a write interrupted by this very signal), and the
            # stream would raise "reentrant call" where the main thread was.
            try:
                os.write(2, b"Ctrl-C: checkpointing after this step "
                            b"(press Ctrl-C again to abort at once)\n")
            except OSError:
                pass
        self.names.add(name)
        self.received = self.received or name

    def __exit__(self, *exc: Any) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


# --------------------------------------------------------------------------- training
class Trainer:
    """One stage in one run directory. `run()` trains until done, stopped or preempted."""

    def __init__(self, stage: StageConfig, options: TrainOptions, plan: RunPlan | None = None):
        self.stage = stage
        self.options = options
        self.plan = plan  # the pre-flight's phase plan, logged at start
        self.started = time.monotonic()
        self.run_dir = Path(options.run_dir)
        self.context = distributed.init_distributed(options.device)
        self.device = self.context.device
        self.mkl_reproducible: bool | None = None  # config.yaml records it (None: not asked, no MKL)
        if options.deterministic:
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
            self.mkl_reproducible = reproducible_mkl()
            if self.mkl_reproducible is False:
                warnings.warn("--deterministic: MKL's reproducible mode could not be set in this "
                              "process (a matrix product ran before, or this MKL lacks the switch); "
                              "set MKL_CBWR=COMPATIBLE in the environment for bitwise repeatable "
                              "runs", RuntimeWarning, stacklevel=2)
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self._start_streams()

        self.net = build_network(self.device, options.load_network, single_object=stage.single_object,
                                 imagenet_resnet50=options.imagenet_resnet50,
                                 imagenet_resnet18=options.imagenet_resnet18,
                                 channels_last=options.channels_last)
        params = [p for p in self.net.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(params, stage)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=list(stage.lr_steps), gamma=stage.lr_gamma)
        self.amp = amp_policy(self.device, options.amp)
        if self.amp.dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise ValueError(f"--amp bf16: {torch.cuda.get_device_name(self.device)} does not support "
                             "bf16; use --amp fp16 (the published setting)")
        self.amp_dtype = self.amp.dtype
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp.grad_scaler)

        self.model: torch.nn.Module = self.net
        if self.context.distributed:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if options.compile:
            self.model = torch.compile(self.model)

        self.checkpoints = CheckpointManager(self.run_dir, options.keep_last, options.snapshot_every)
        self.iteration = 0
        self.loader_state: dict[str, Any] | None = None  # {"phase": i, "state": loader state}
        self.losses: list[float] = []
        self.recent_nonfinite: collections.deque[int] = collections.deque(maxlen=NONFINITE_WINDOW)
        self.bad_samples_before = 0  # loader bad samples of the phases finished before this one
        self.last_metrics: dict[str, float] = {}
        self.clips_seen = 0            # this run, this rank: clips that reached a step
        self.clips_without_target = 0  # ... of which had no object (meta "objects": [])
        self.empty_warned = False

    # ---------------------------------------------------------------- state
    def _start_streams(self, resumed_at: int | None = None) -> None:
        """Seed this rank's random streams (stcn.train.seeding): fresh, or for an elastic resume."""
        streams = rank_streams(self.options.seed, self.stage.stage, self.context.rank,
                               resumed_at, self.context.world_size)
        seed_globals(streams.global_seed)
        self.sample_rng, self.augment_rng = streams.sample_rng, streams.augment_rng

    def _rank_state(self, loader: Any, phase: int) -> dict[str, Any]:
        return {
            "rng": capture_rng_states(),
            "sample_rng": self.sample_rng.bit_generator.state,
            "augment_rng": self.augment_rng.get_state(),
            "loader": {"phase": phase, "state": loader.state_dict()},
        }

    def state_dict(self, loader: Any, phase: int) -> dict[str, Any] | None:
        """The checkpoint (on rank 0; None elsewhere). Per-rank states are gathered."""
        rank_state = self._rank_state(loader, phase)
        if self.context.distributed:
            gathered: list[Any] = [None] * self.context.world_size
            torch.distributed.all_gather_object(gathered, rank_state)
        else:
            gathered = [rank_state]
        if not self.context.is_main:
            return None
        return {
            "iteration": self.iteration,
            "stage": self.stage.to_dict(),
            "world_size": self.context.world_size,
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ranks": gathered,
            "recent_nonfinite": list(self.recent_nonfinite),
            "bad_samples_before": self.bad_samples_before,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["stage"]["stage"] != self.stage.stage:
            raise ValueError(
                f"checkpoint in {self.run_dir} is for stage {state['stage']['stage']}, "
                f"not {self.stage.stage}: "
                "use a fresh --run-dir per stage and --load-network to start from earlier weights")
        # A field newer than the checkpoint (e.g. schedule_scaling) has no saved value to differ from.
        changed = sorted(k for k, v in self.stage.to_dict().items()
                         if k in state["stage"] and state["stage"][k] != v)
        if changed:
            warnings.warn("resuming with stage settings that differ from the checkpoint's "
                          f"({', '.join(changed)}); "
                          "the lr schedule's milestones stay those of the checkpoint", stacklevel=2)
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] and self.scaler.is_enabled():  # empty when saved without fp16
            self.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])
        self.recent_nonfinite.extend(int(v) for v in state.get("recent_nonfinite", []))
        self.bad_samples_before = int(state.get("bad_samples_before", 0))
        ranks = state["ranks"]
        if len(ranks) == self.context.world_size:
            own = ranks[self.context.rank]
            restore_rng_states(own["rng"])
            self.sample_rng.bit_generator.state = own["sample_rng"]
            self.augment_rng.set_state(own["augment_rng"])
            self.loader_state = own["loader"]
        else:
            # Elastic resume: the loader re-splits the remaining epoch; random streams restart
            # keyed by the iteration and world size, so no stream repeats.
            warnings.warn(f"resuming a {len(ranks)}-process checkpoint with {self.context.world_size} "
                          "processes: data position is kept, random streams are reseeded",
                          stacklevel=2)
            self._start_streams(resumed_at=self.iteration)
            # The loader's position (epoch plan and batches delivered) is the same on every rank.
            self.loader_state = ranks[0]["loader"]

    def weights_finite(self) -> bool:
        """Whether every parameter and buffer is finite (the same on every rank)."""
        return all(bool(torch.isfinite(t).all()) for t in self.net.state_dict().values()
                   if t.is_floating_point())

    def save_checkpoint(self, loader: Any, phase: int) -> bool:
        """Checkpoint (True), or refuse when the weights are not finite (False): a diverged
        model never replaces the last good checkpoint."""
        if not self.weights_finite():
            return False
        state = self.state_dict(loader, phase)
        if state is not None:
            self.checkpoints.save(state, self.iteration)
        distributed.barrier()
        return True

    def diverged(self, monitor: TrainingMonitor, why: str) -> str:
        good = self.checkpoints.checkpoints()
        monitor.message(f"diverged at iteration {self.iteration}: {why}. No checkpoint or weights "
                        "are written from this state; the last good checkpoint is "
                        f"{good[-1][1] if good else 'none'} (lower --lr, or check the data).")
        return "diverged"

    # ---------------------------------------------------------------- data
    def phase_sets(self, phase: int) -> dict[str, float]:
        if self.options.shard_sets:
            return dict(self.options.shard_sets)
        return self.stage.shard_sets(phase, self.options.shards)

    def phase_clips(self, phase: int, from_iteration: int) -> PhaseClips:
        """The ranges of its sets phase `phase` reads (phases sharing a set split it by
        their iterations, stcn.train.clip_ranges) and what it streams from `from_iteration`."""
        import shards

        sets_by_phase = [self.phase_sets(p) if p == phase else self._sets_or_none(p)
                         for p in range(len(self.stage.phases))]
        totals = {url: shards.read_manifest(url).num_samples for url in sets_by_phase[phase]}
        begun = max(0, from_iteration - self.stage.phase_start_iteration(phase))
        return clip_ranges.phase_clips(self.stage, sets_by_phase, phase, totals,
                                       self.context.world_size, from_iteration,
                                       delivered=begun * self.stage.batch_size * self.context.world_size)

    def _sets_or_none(self, phase: int) -> dict[str, float]:
        try:
            return self.phase_sets(phase)
        except ValueError:  # a phase naming no sets fails when it starts, not before
            return {}

    def check_clips(self, clips: PhaseClips, loader: Any) -> str:
        """Refuse (NotEnoughClipsError) a phase whose rest would stream a clip twice, unless
        --allow-repeats; exact: the loader knows how many batches its epoch has left (after
        a resume, an elastic one included). Returns the phase's log line."""
        left = clips.end - clips.start
        if loader.epoch == 0:  # what the loader delivered, whatever world sizes it ran at
            clips = dataclasses.replace(clips, delivered=sum(
                leg.batches * leg.world * leg.batch for leg in loader.legs))
        fits = loader.epoch == 0 and len(loader) >= left and all(s.weight <= 1 for s in clips.sets)
        if not fits and not self.options.allow_repeats:
            raise clip_ranges.NotEnoughClipsError(
                clips.problem() or f"phase {clips.phase} needs {left} more batches per process, "
                f"its ranges hold {len(loader)} not yet streamed; pass --allow-repeats or make "
                "the sets bigger")
        line = clips.describe()
        if not fits and clips.fits:  # the exact count differs from the estimate
            line += f" (repeats: only {len(loader)} of {left} batches left unstreamed)"
        return line

    def check_later_phases(self) -> None:
        """At start and resume: every phase after the current one fits at this world size
        (an elastic resume onto more GPUs needs more clips), or --allow-repeats."""
        phase = self.stage.phase_index(self.iteration)
        for later in range(phase + 1, len(self.stage.phases)):
            if self.stage.phase_end_iteration(later) > self.stage.phase_start_iteration(later):
                problem = self.phase_clips(later, self.iteration).problem()
                if problem and not self.options.allow_repeats:
                    raise clip_ranges.NotEnoughClipsError(
                        f"at iteration {self.iteration} on {self.context.world_size} process(es): {problem}")

    def batches(self, loader: Any) -> Iterator[dict[str, Any]]:
        """Endless batches: a finished epoch starts the next one."""
        empty_passes = 0
        while True:
            produced = False
            for batch in loader:
                produced = True
                yield batch
            # A resumed loader may sit at the very end of an epoch: one empty pass is normal.
            empty_passes = 0 if produced else empty_passes + 1
            if empty_passes > 1:
                raise RuntimeError("the shard loader produced no batch: are the shard sets empty?")

    # ---------------------------------------------------------------- step
    def step(self, frames: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Forward and loss of one batch (no backward)."""
        single = self.stage.single_object
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            if single:
                out = self.model(frames, targets["first"])
            else:
                out = self.model(frames, targets["first"], targets["second"], targets["selector"])
        fraction = bootstrap_fraction(self.iteration, self.stage.bootstrap_start,
                                      self.stage.bootstrap_end, self.stage.bootstrap_final_fraction)
        present = None
        if not single:
            selector = targets["selector"] > 0.5
            present = torch.cat([torch.ones_like(selector[:, :1]), selector], dim=1)
        result: dict[str, torch.Tensor] = {}
        total = 0.0
        for index, logits in enumerate(out["logits"], start=1):
            loss = bootstrapped_cross_entropy(logits, targets["classes"][:, index], fraction, present)
            result[f"loss_frame{index}"] = loss
            total = total + loss
            result[f"iou_frame{index}"] = mask_iou(out["masks"][index - 1][:, 0] > 0.5,
                                                   targets["classes"][:, index] == 1)
        result["loss"] = total
        result["bootstrap_fraction"] = torch.tensor(fraction)
        result["logits"] = [logits.detach() for logits in out["logits"]]
        return result

    # ---------------------------------------------------------------- loop
    def run(self) -> TrainResult:
        # Handlers first: a preemption signal during start-up must not kill the process.
        with StopSignal() as stop_signal:
            resumed = self.checkpoints.resolve(self.options.resume, map_location="cpu",
                                               is_main=self.context.is_main)
            if resumed is not None:
                self.load_state_dict(resumed[0])
            if self.context.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / "stage.json").write_text(json.dumps(self.stage.to_dict(), indent=2))
                write_config(self.run_dir, self.run_config(resumed[1] if resumed else None))
            monitor = TrainingMonitor(self.run_dir, self.context.is_main, self.stage.iterations,
                                      initial=self.iteration, image_every=self.options.image_every,
                                      progress=self.options.progress)
            if resumed is not None:
                monitor.message(f"resumed from {resumed[1]} at iteration {self.iteration}")
            monitor.message(describe_schedule(self.stage) + f"\n  AMP: {self.amp.describe()}")
            if self.plan is not None:
                monitor.message(self.plan.format())
            try:
                status = self._loop(monitor, stop_signal)
            finally:
                monitor.close()
        weights = None
        if status == "completed" and not self.weights_finite():
            status = "diverged"  # never export non-finite weights
        if status == "completed":
            weights = self.run_dir / f"stcn_stage{self.stage.stage}.pth"
            if self.context.is_main:
                save_stcn_weights(unwrap_model(self.model), weights)
            distributed.barrier()
        return self.finish(TrainResult(status, self.iteration, self.losses, weights, self.last_metrics))

    # ---------------------------------------------------------------- records
    def run_config(self, resumed_from: Path | None) -> dict[str, Any]:
        """config.yaml: every resolved option and the software that runs them."""
        return resolved_config(self.stage, self.options, self.context.world_size,
                               device=str(self.device), amp=self.amp.describe(),
                               resumed_from=str(resumed_from) if resumed_from else None,
                               start_iteration=self.iteration,
                               mkl_reproducible=self.mkl_reproducible)

    def finish(self, result: TrainResult) -> TrainResult:
        """Write summary.json (main rank) for however the run ended; returns `result`."""
        if not self.context.is_main:
            return result
        timer = getattr(self, "timer", None)
        totals = timer.totals() if timer is not None else {}
        metrics = result.last_metrics
        final_loss = metrics.get("loss", result.losses[-1] if result.losses else None)
        write_summary(self.run_dir, {
            "status": result.status,
            "stage": self.stage.stage,
            "iterations_done": result.iteration,
            "iterations_total": self.stage.iterations,
            "iterations_this_run": len(result.losses),
            "final_loss": final_loss,
            "final_iou_frame1": metrics.get("iou_frame1"),
            "final_iou_frame2": metrics.get("iou_frame2"),
            "wall_seconds": round(time.monotonic() - self.started, 3),
            "clips_per_s": totals.get("clips_per_s", 0.0) * self.context.world_size,
            "data_wait_fraction": totals.get("data_wait_fraction"),
            "world_size": self.context.world_size,
            "bad_samples": metrics.get("bad_samples"),  # whole run: every phase, every resume
            # this run's clips (main rank) and the share without a target object
            "clips_seen": self.clips_seen,
            "clips_without_target_share": round(self.clips_without_target / self.clips_seen, 4)
            if self.clips_seen else None,
            "checkpoints": [str(path) for _, path in self.checkpoints.checkpoints()],
            "weights": str(result.weights_path) if result.weights_path else None,
        })
        return result

    def _loop(self, monitor: TrainingMonitor, stop_signal: StopSignal) -> str:
        stage, options = self.stage, self.options
        self.net.train()
        self.last_metrics = {}
        timer = self.timer = StepTimer(self.device)
        window: dict[str, list[torch.Tensor]] = {}  # logged scalar -> its finite steps since the last log
        nonfinite = 0
        checkpoint_due = False
        self.check_later_phases()
        while self.iteration < stage.iterations:
            phase = stage.phase_index(self.iteration)
            clips = self.phase_clips(phase, self.iteration)
            augmentation = online_augmentation_for({s.url: s.weight for s in clips.sets})
            loader = open_loader(clips.sets, stage, options, self.context, phase)
            if self.loader_state is not None and self.loader_state["phase"] == phase:
                loader.load_state_dict(self.loader_state["state"])
            self.loader_state = None
            monitor.message(self.check_clips(clips, loader))
            batches = self.batches(loader)
            timer.restart()
            while self.iteration < stage.phase_end_iteration(phase):
                batch = next(batches)
                timer.data_ready()
                frames, masks, soft = prepare_batch(batch["frames"], batch["masks"], augmentation,
                                                    self.augment_rng, self.device, options.crop,
                                                    options.crop_mode, options.channels_last,
                                                    batch.get("soft"))
                chosen = select_objects(batch["meta"], self.sample_rng, stage.single_object)
                self.count_targets(chosen[0], final=self.iteration + 1 == stage.iterations)
                targets = clip_targets(masks, *chosen, soft, batch.get("has_soft"))
                self.optimizer.zero_grad(set_to_none=True)
                out = self.step(frames, targets)
                # Per-step scalars, averaged over the log window (one line each).
                figures = {"loss": out["loss"].detach(),
                           "loss_frame1": out["loss_frame1"].detach(),
                           "loss_frame2": out["loss_frame2"].detach(),
                           "iou_frame1": out["iou_frame1"],
                           "iou_frame2": out["iou_frame2"]}
                finite = bool(torch.isfinite(figures["loss"]))
                skipped = distributed.any_rank(not finite, self.device)
                self.recent_nonfinite.append(int(skipped))
                if skipped:
                    nonfinite += 1
                    message = (f"non-finite loss at iteration {self.iteration} on rank {self.context.rank} "
                               f"(samples: {', '.join(batch['__key__'])})")
                    if not finite:
                        print(message, flush=True)
                    if options.nan_policy == "stop":
                        raise NonFiniteLossError(
                            message + "; policy stop (--nan-policy skip skips such steps)")
                else:
                    self.scaler.scale(out["loss"]).backward()
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    self.losses.append(float(figures["loss"]))
                # a skipped step still names its scalars, so a window of only skipped steps logs NaN
                for name, value in figures.items():
                    column = window.setdefault(name, [])
                    if not skipped:
                        column.append(value.float())
                with warnings.catch_warnings():
                    # The schedule follows iterations, skipped ones included (torch warns when
                    # the very first optimizer step was skipped).
                    warnings.filterwarnings(
                        "ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
                    self.scheduler.step()
                self.iteration += 1
                timer.step_done(frames.shape[0])

                if monitor.wants_images(self.iteration):
                    self._log_images(monitor, frames, targets, out)
                if self.iteration % options.log_every == 0 or self.iteration == stage.iterations:
                    self._log(monitor, window, timer, out, nonfinite, loader)
                    window = {}
                    timer.reset()
                if sum(self.recent_nonfinite) > options.max_nonfinite:
                    return self.diverged(monitor, f"{sum(self.recent_nonfinite)} of the last "
                                         f"{len(self.recent_nonfinite)} steps had a non-finite loss "
                                         f"(more than --max-nonfinite {options.max_nonfinite})")
                signalled = distributed.any_rank(stop_signal.received is not None, self.device)
                stop_after = options.stop_after is not None and self.iteration >= options.stop_after
                if signalled or stop_after:
                    if not self.save_checkpoint(loader, phase):
                        return self.diverged(monitor, "the weights are not finite")
                    reason = (f"signal {stop_signal.received or 'on another rank'}" if signalled
                              else "--stop-after")
                    monitor.message(f"checkpointed at iteration {self.iteration} ({reason})")
                    return stop_signal.status if signalled else "stopped"
                if self.iteration % options.checkpoint_every == 0 or self.iteration == stage.iterations:
                    checkpoint_due = True
                # Weights that just gave a non-finite loss are suspect: the checkpoint waits
                # for a finite step (or the end), so it never replaces a good one with them.
                if checkpoint_due and (not skipped or self.iteration == stage.iterations):
                    if not self.save_checkpoint(loader, phase):
                        return self.diverged(monitor, "the weights are not finite")
                    checkpoint_due = False
            self.bad_samples_before += loader.stats.bad_samples
        return "completed"

    def count_targets(self, targets: list[int], final: bool = False) -> None:
        """Count clips without a target object; warn once (main rank) when they are more than
        EMPTY_CLIP_WARN_SHARE of what this run streamed, after EMPTY_CLIP_MIN_SEEN clips or at
        the last iteration."""
        self.clips_seen += len(targets)
        self.clips_without_target += sum(1 for t in targets if t < 0)
        share = self.clips_without_target / max(self.clips_seen, 1)
        if (not self.empty_warned and self.context.is_main and share > EMPTY_CLIP_WARN_SHARE
                and (self.clips_seen >= EMPTY_CLIP_MIN_SEEN or final)):
            self.empty_warned = True
            warnings.warn(f"{share:.0%} of the clips stage {self.stage.stage} streamed so far "
                          f"({self.clips_without_target} of {self.clips_seen}) have no target object "
                          "(all-background masks): the network learns mostly background; check the "
                          "shard sets (tools/inspect_shards) or the source annotations", stacklevel=2)

    def _log(self, monitor: TrainingMonitor, window: Mapping[str, list[torch.Tensor]], timer: StepTimer,
             out: Mapping[str, Any], nonfinite: int, loader: Any) -> None:
        means = {name: torch.stack(values).mean() if values else math.nan for name, values in window.items()}
        figures = distributed.all_reduce_mean_named(means, self.device)  # one collective for all
        figures.update(timer.summary())
        figures["clips_per_s"] *= self.context.world_size
        figures["lr"] = self.scheduler.get_last_lr()[0]
        figures["bootstrap_fraction"] = float(out["bootstrap_fraction"])
        figures["gpu_memory_gib"] = gpu_memory_gib(self.device)
        figures["nonfinite_steps"] = float(nonfinite)
        stats = getattr(loader, "stats", None)
        if stats is not None:
            figures["bad_samples"] = float(self.bad_samples_before + stats.bad_samples)  # whole run
            figures["epoch"] = float(loader.epoch)
            # this phase's loader: storage retries, whole-shard downloads, node-cache hits
            for name in ("retries", "downloads", "cache_hits"):
                figures[f"loader_{name}"] = float(getattr(stats, name, 0))
        self.last_metrics = figures
        monitor.scalars(self.iteration, figures)
        monitor.progress(self.iteration, {k: figures[k] for k in
                                          ("loss", "iou_frame2", "lr", "clips_per_s", "data_wait_fraction")})

    def _log_images(self, monitor: TrainingMonitor, frames: torch.Tensor,
                    targets: Mapping[str, torch.Tensor], out: Mapping[str, Any]) -> None:
        gt = targets["classes"]
        predicted = torch.stack([gt[:, 0]] + [logits.argmax(1) for logits in out["logits"]], dim=1)
        monitor.images(self.iteration, frames, gt, predicted)


def train(stage: StageConfig, options: TrainOptions,
          make_clips: Mapping[str, int] | None = None) -> TrainResult:
    """Run one stage (see the module docstring); the process group is torn down afterwards.

    The pre-flight (`stcn.train.preflight`) runs first: every problem of every phase is raised as
    one PreflightError before anything is written. make_clips: shard set URL -> clips
    `tools/make_shards plan` would make, for the commands that make missing sets.
    """
    plan = check_run(stage, options, world_size_from_env(), make_clips)
    plan.raise_if_problems()
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        with rank_log(options.run_dir, int(os.environ.get("RANK", 0)), options.rank_logs):
            return Trainer(stage, options, plan).run()
    finally:
        torch.use_deterministic_algorithms(deterministic)
        distributed.cleanup()


__all__ = ["TrainOptions", "TrainResult", "Trainer", "train", "NonFiniteLossError",
           "PREEMPTED_EXIT_CODE", "NAN_POLICIES", "AMP_MODES", "AmpPolicy", "amp_policy",
           "parse_shard_arguments", "select_objects", "clip_targets"]
