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

import dataclasses
import json
import math
import random
import re
import signal
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from stcn import distributed
from stcn.checkpoint import CheckpointManager, capture_rng_states, restore_rng_states, unwrap_model
from stcn.losses import bootstrap_fraction, bootstrapped_cross_entropy, mask_iou
from stcn.monitor import StepTimer, TrainingMonitor, gpu_memory_gib
from stcn.network import STCN
from stcn.online_augment import CROP_MODES, OnlineAugmentation, prepare_batch
from stcn.stages import StageConfig
from stcn.weights import init_from_imagenet, load_stcn_weights, save_stcn_weights

#: Exit status meaning "checkpointed on a preemption signal, run me again" (EX_TEMPFAIL).
PREEMPTED_EXIT_CODE = 75
NAN_POLICIES = ("skip", "stop")


@dataclass
class TrainOptions:
    """Run-level settings (the stage itself is a `StageConfig`). Defaults in one place."""

    run_dir: str
    shards: str | None = None  # shard root; each phase's sets are derived from it
    shard_sets: Mapping[str, float] | None = None  # explicit URL -> weight, used by every phase
    load_network: str | None = None  # STCN weights to start from (stage 0 widened)
    imagenet_resnet50: str | None = None  # torchvision-layout files, when not loading STCN
    imagenet_resnet18: str | None = None
    resume: str | None = "auto"  # "auto", a checkpoint path, or None for a fresh run
    device: str | None = None  # "cuda", "cuda:N", "cpu", or "auto"/None (CUDA when available)
    amp: bool = True  # bf16 where supported, fp16 + GradScaler otherwise; never on CPU
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
    stop_after: int | None = None  # checkpoint and return after this many total iterations
    progress: bool = True

    def __post_init__(self) -> None:
        if self.nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {self.nan_policy!r}")
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode must be one of {CROP_MODES}, got {self.crop_mode!r}")
        if self.crop is not None and self.crop % 16:
            raise ValueError(f"crop {self.crop} must be a multiple of 16 (the network's stride)")
        for name in ("checkpoint_every", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


@dataclass
class TrainResult:
    status: str  # "completed", "preempted", "stopped" (stop_after) or "diverged"
    iteration: int
    losses: list[float]  # total loss of every iteration run in this process (rank 0's view)
    weights_path: Path | None = None
    last_metrics: dict[str, float] = dataclasses.field(default_factory=dict)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf and the policy is `stop`."""


# --------------------------------------------------------------------------- data
def open_loader(sets: Mapping[str, float], stage: StageConfig, options: TrainOptions,
                context: distributed.DistributedContext, phase: int):
    """The streaming loader for one skip phase's shard sets, split over ranks and workers."""
    import shards

    return shards.make_loader(
        [shards.ShardSource(url, weight) for url, weight in sets.items()],
        batch_size=stage.batch_size,
        rank=context.rank,
        world_size=context.world_size,
        seed=options.seed * 1000 + stage.stage * 100 + phase,
        num_workers=options.workers,
        pin_memory=context.device.type == "cuda",
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


def clip_targets(masks: torch.Tensor, targets: list[int], seconds: list[int]) -> dict[str, torch.Tensor]:
    """Network inputs and CE targets from uint8 id maps (B, 3, H, W).

    first/second: (B, 1, H, W) float masks of frame 0; selector (B, 2);
    classes: (B, 3, H, W) long, 0 background, 1 target, 2 second object.
    """
    ids = masks.long()
    target = torch.tensor(targets, device=masks.device).view(-1, 1, 1, 1)
    second = torch.tensor(seconds, device=masks.device).view(-1, 1, 1, 1)
    is_target = ids == target
    is_second = (ids == second) & (second >= 0)
    classes = is_target.long() + 2 * is_second.long()
    selector = torch.stack([torch.ones(len(targets)), (torch.tensor(seconds) >= 0).float()], 1)
    return {
        "first": is_target[:, :1].float(),
        "second": is_second[:, :1].float(),
        "selector": selector.to(masks.device),
        "classes": classes,
    }


# --------------------------------------------------------------------------- model
def autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """bf16 where the GPU supports it, fp16 otherwise, None (no autocast) on CPU or with amp off."""
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def build_network(stage: StageConfig, options: TrainOptions, device: torch.device) -> STCN:
    net = STCN(single_object=stage.single_object)
    if options.load_network:
        load_stcn_weights(net, options.load_network)
    elif options.imagenet_resnet50 or options.imagenet_resnet18:
        init_from_imagenet(net, options.imagenet_resnet50, options.imagenet_resnet18)
    net.freeze_batchnorm(True)
    net.to(device)
    if options.channels_last:
        net.to(memory_format=torch.channels_last)
    return net


def make_optimizer(params: list[torch.nn.Parameter], stage: StageConfig) -> torch.optim.Adam:
    """Adam as published; the fused kernel (same update, far fewer launches) where available."""
    try:
        return torch.optim.Adam(params, lr=stage.lr, weight_decay=stage.weight_decay, fused=True)
    except (RuntimeError, TypeError):  # older torch, or a device without fused kernels
        return torch.optim.Adam(params, lr=stage.lr, weight_decay=stage.weight_decay)


# --------------------------------------------------------------------------- signals
class StopSignal:
    """Records SIGTERM/SIGUSR1 so the loop can stop cleanly after the current step."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                number = getattr(signal, name, None)
                if number is not None:
                    self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number: int, frame: Any) -> None:
        self.received = signal.Signals(number).name

    def __exit__(self, *exc: Any) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


# --------------------------------------------------------------------------- training
class Trainer:
    """One stage in one run directory. `run()` trains until done, stopped or preempted."""

    def __init__(self, stage: StageConfig, options: TrainOptions):
        self.stage = stage
        self.options = options
        self.run_dir = Path(options.run_dir)
        self.context = distributed.init_distributed(options.device)
        self.device = self.context.device
        if options.deterministic:
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self._seed_everything(options.seed)

        self.net = build_network(stage, options, self.device)
        params = [p for p in self.net.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(params, stage)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=list(stage.lr_steps), gamma=stage.lr_gamma)
        self.amp_dtype = autocast_dtype(self.device, options.amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

        self.model: torch.nn.Module = self.net
        if self.context.distributed:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if options.compile:
            self.model = torch.compile(self.model)

        self.checkpoints = CheckpointManager(self.run_dir, options.keep_last, options.snapshot_every)
        self.iteration = 0
        self.loader_state: dict[str, Any] | None = None  # {"phase": i, "state": loader state}
        self.sample_rng = np.random.default_rng([options.seed, self.context.rank, stage.stage])
        self.augment_rng = torch.Generator().manual_seed(options.seed * 7919 + self.context.rank)
        self.losses: list[float] = []
        self.last_metrics: dict[str, float] = {}

    # ---------------------------------------------------------------- state
    def _seed_everything(self, seed: int) -> None:
        rank_seed = seed + 1_000_003 * self.context.rank
        random.seed(rank_seed)
        np.random.seed(rank_seed % 2**32)
        torch.manual_seed(rank_seed)

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
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["stage"]["stage"] != self.stage.stage:
            raise ValueError(
                f"checkpoint in {self.run_dir} is for stage {state['stage']['stage']}, not {self.stage.stage}: "
                "use a fresh --run-dir per stage and --load-network to start from earlier weights")
        changed = sorted(k for k, v in self.stage.to_dict().items() if state["stage"].get(k) != v)
        if changed:
            warnings.warn(f"resuming with stage settings that differ from the checkpoint's ({', '.join(changed)}); "
                          "the lr schedule's milestones stay those of the checkpoint")
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] and self.scaler.is_enabled():  # empty when saved without fp16
            self.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])
        ranks = state["ranks"]
        if len(ranks) == self.context.world_size:
            own = ranks[self.context.rank]
            restore_rng_states(own["rng"])
            self.sample_rng.bit_generator.state = own["sample_rng"]
            self.augment_rng.set_state(own["augment_rng"])
            self.loader_state = own["loader"]
        else:
            # Elastic resume: the loader re-splits the remaining epoch; random streams restart
            # from a seed that depends on the iteration, so no stream repeats.
            warnings.warn(f"resuming a {len(ranks)}-process checkpoint with {self.context.world_size} "
                          "processes: data position is kept, random streams are reseeded")
            self._seed_everything(self.options.seed + self.iteration)
            self.sample_rng = np.random.default_rng([self.options.seed, self.context.rank, self.iteration])
            self.augment_rng.manual_seed(self.options.seed * 7919 + self.context.rank + self.iteration)
            # The loader's position (epoch plan and batches delivered) is the same on every rank.
            self.loader_state = ranks[0]["loader"]

    def save_checkpoint(self, loader: Any, phase: int) -> None:
        state = self.state_dict(loader, phase)
        if state is not None:
            self.checkpoints.save(state, self.iteration)
        distributed.barrier()

    # ---------------------------------------------------------------- data
    def phase_sets(self, phase: int) -> dict[str, float]:
        if self.options.shard_sets:
            return dict(self.options.shard_sets)
        return self.stage.shard_sets(phase, self.options.shards)

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
        result["logits"] = [l.detach() for l in out["logits"]]
        return result

    # ---------------------------------------------------------------- loop
    def run(self) -> TrainResult:
        # Handlers first: a preemption signal during start-up must not kill the process.
        with StopSignal() as stop_signal:
            resumed = self.checkpoints.resolve(self.options.resume, map_location="cpu")
            if resumed is not None:
                self.load_state_dict(resumed[0])
            if self.context.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / "stage.json").write_text(json.dumps(self.stage.to_dict(), indent=2))
            monitor = TrainingMonitor(self.run_dir, self.context.is_main, self.stage.iterations,
                                      initial=self.iteration, image_every=self.options.image_every,
                                      progress=self.options.progress)
            if resumed is not None:
                monitor.message(f"resumed from {resumed[1]} at iteration {self.iteration}")
            try:
                status = self._loop(monitor, stop_signal)
            finally:
                monitor.close()
        weights = None
        if status == "completed":
            weights = self.run_dir / f"stcn_stage{self.stage.stage}.pth"
            if self.context.is_main:
                save_stcn_weights(unwrap_model(self.model), weights)
            distributed.barrier()
        return TrainResult(status, self.iteration, self.losses, weights, self.last_metrics)

    def _loop(self, monitor: TrainingMonitor, stop_signal: StopSignal) -> str:
        stage, options = self.stage, self.options
        self.net.train()
        self.last_metrics = {}
        timer = StepTimer(self.device)
        window: list[torch.Tensor] = []
        nonfinite = 0
        while self.iteration < stage.iterations:
            phase = stage.phase_index(self.iteration)
            sets = self.phase_sets(phase)
            augmentation = online_augmentation_for(sets)
            loader = open_loader(sets, stage, options, self.context, phase)
            if self.loader_state is not None and self.loader_state["phase"] == phase:
                loader.load_state_dict(self.loader_state["state"])
            self.loader_state = None
            monitor.message(f"phase {phase}: iterations {self.iteration}-{stage.phase_end_iteration(phase)}, "
                            f"shard sets {sets}")
            batches = self.batches(loader)
            timer.restart()
            while self.iteration < stage.phase_end_iteration(phase):
                batch = next(batches)
                timer.data_ready()
                frames, masks = prepare_batch(batch["frames"], batch["masks"], augmentation,
                                              self.augment_rng, self.device, options.crop,
                                              options.crop_mode, options.channels_last)
                targets = clip_targets(masks, *select_objects(batch["meta"], self.sample_rng,
                                                              stage.single_object))
                self.optimizer.zero_grad(set_to_none=True)
                out = self.step(frames, targets)
                figures = torch.stack([out["loss"].detach(), out["loss_frame1"].detach(),
                                       out["loss_frame2"].detach(), out["iou_frame1"],
                                       out["iou_frame2"]]).float().cpu()
                finite = bool(torch.isfinite(figures[0]))
                if distributed.any_rank(not finite, self.device):
                    nonfinite += 1
                    message = (f"non-finite loss at iteration {self.iteration} on rank {self.context.rank} "
                               f"(samples: {', '.join(batch['__key__'])})")
                    if not finite:
                        print(message, flush=True)
                    if options.nan_policy == "stop":
                        raise NonFiniteLossError(message + "; policy stop (--nan-policy skip skips such steps)")
                else:
                    self.scaler.scale(out["loss"]).backward()
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    self.losses.append(float(figures[0]))
                    window.append(figures)
                with warnings.catch_warnings():
                    # The schedule follows iterations, skipped ones included (torch warns when
                    # the very first optimizer step was skipped).
                    warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
                    self.scheduler.step()
                self.iteration += 1
                timer.step_done(frames.shape[0])

                if monitor.wants_images(self.iteration):
                    self._log_images(monitor, frames, targets, out)
                if self.iteration % options.log_every == 0 or self.iteration == stage.iterations:
                    self._log(monitor, window, timer, out, nonfinite, loader)
                    window = []
                    timer.reset()
                signalled = distributed.any_rank(stop_signal.received is not None, self.device)
                stop_after = options.stop_after is not None and self.iteration >= options.stop_after
                if signalled or stop_after:
                    self.save_checkpoint(loader, phase)
                    reason = f"signal {stop_signal.received or 'on another rank'}" if signalled else "--stop-after"
                    monitor.message(f"checkpointed at iteration {self.iteration} ({reason})")
                    return "preempted" if signalled else "stopped"
                if self.iteration % options.checkpoint_every == 0 or self.iteration == stage.iterations:
                    self.save_checkpoint(loader, phase)
        return "completed"

    def _log(self, monitor: TrainingMonitor, window: list[torch.Tensor], timer: StepTimer,
             out: Mapping[str, Any], nonfinite: int, loader: Any) -> None:
        names = ("loss", "loss_frame1", "loss_frame2", "iou_frame1", "iou_frame2")
        means = torch.stack(window).mean(0) if window else torch.full((len(names),), math.nan)
        means = distributed.all_reduce_mean(means.to(self.device)).cpu()
        figures = {name: float(v) for name, v in zip(names, means)}
        figures.update(timer.summary())
        figures["clips_per_s"] *= self.context.world_size
        figures["lr"] = self.scheduler.get_last_lr()[0]
        figures["bootstrap_fraction"] = float(out["bootstrap_fraction"])
        figures["gpu_memory_gib"] = gpu_memory_gib(self.device)
        figures["nonfinite_steps"] = float(nonfinite)
        stats = getattr(loader, "stats", None)
        if stats is not None:
            figures["bad_samples"] = float(stats.bad_samples)
            figures["epoch"] = float(loader.epoch)
        self.last_metrics = figures
        monitor.scalars(self.iteration, figures)
        monitor.progress(self.iteration, {k: figures[k] for k in
                                          ("loss", "iou_frame2", "lr", "clips_per_s", "data_wait_fraction")})

    def _log_images(self, monitor: TrainingMonitor, frames: torch.Tensor,
                    targets: Mapping[str, torch.Tensor], out: Mapping[str, Any]) -> None:
        gt = targets["classes"]
        predicted = torch.stack([gt[:, 0]] + [l.argmax(1) for l in out["logits"]], dim=1)
        monitor.images(self.iteration, frames, gt, predicted)


def train(stage: StageConfig, options: TrainOptions) -> TrainResult:
    """Run one stage (see the module docstring); the process group is torn down afterwards."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        return Trainer(stage, options).run()
    finally:
        torch.use_deterministic_algorithms(deterministic)
        distributed.cleanup()


__all__ = ["TrainOptions", "TrainResult", "Trainer", "train", "NonFiniteLossError",
           "PREEMPTED_EXIT_CODE", "NAN_POLICIES", "parse_shard_arguments", "select_objects", "clip_targets", "autocast_dtype"]
