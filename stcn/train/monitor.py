"""Training monitoring: TensorBoard scalars and image grids, console progress, step timing.

Only the main rank writes; other ranks get a monitor whose methods do nothing, so the
training loop calls it unconditionally.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Mapping

import torch

from shards import console
from shards.images import OBJECT_COLOURS

from stcn.model.inputs import IMAGENET_MEAN, IMAGENET_STD

# Prediction/ground-truth overlays draw object ids in the contact sheets' colours.
_COLOURS = torch.from_numpy(OBJECT_COLOURS).float() / 255


class StepTimer:
    """Splits each iteration's wall time into data wait and compute.

    Call `data_ready()` when the batch arrives and `step_done()` after the optimiser step;
    `synchronize` makes GPU time count where it is spent.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()
        self._mark = time.perf_counter()
        # Whole-run totals (reset() starts a new logging window only), for summary.json.
        self.run_data_seconds = self.run_total_seconds = 0.0
        self.run_clips = 0

    def reset(self) -> None:
        self.data_seconds = 0.0
        self.total_seconds = 0.0
        self.steps = 0
        self.clips = 0

    def restart(self) -> None:
        self._mark = time.perf_counter()

    def data_ready(self) -> None:
        waited = time.perf_counter() - self._mark
        self.data_seconds += waited
        self.run_data_seconds += waited

    def step_done(self, clips: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.total_seconds += now - self._mark
        self.run_total_seconds += now - self._mark
        self._mark = now
        self.steps += 1
        self.clips += clips
        self.run_clips += clips

    def totals(self) -> dict[str, float]:
        """clips/s and data-wait fraction of this process over the whole run."""
        total = max(self.run_total_seconds, 1e-9)
        return {"clips_per_s": self.run_clips / total, "data_wait_fraction": self.run_data_seconds / total}

    def summary(self) -> dict[str, float]:
        """clips/s, data-wait fraction and seconds per iteration since the last reset."""
        total = max(self.total_seconds, 1e-9)
        return {
            "clips_per_s": self.clips / total,
            "data_wait_fraction": self.data_seconds / total,
            "seconds_per_iteration": total / max(self.steps, 1),
        }


class TrainingMonitor:
    def __init__(self, run_dir: str | Path, enabled: bool, total: int, initial: int = 0,
                 image_every: int = 1000, progress: bool = True):
        self.enabled = enabled
        self.image_every = image_every
        self.writer = None
        self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=initial)
        if progress:
            self.bar = console.progress(total=total, initial=initial, desc="train", unit="it")

    def scalars(self, iteration: int, values: Mapping[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self.writer.add_scalar(f"{prefix}/{name}", value, iteration)

    def progress(self, iteration: int, values: Mapping[str, float]) -> None:
        """Advance the console bar to `iteration` (1-based count of finished iterations)."""
        if self.bar is None:
            return
        self.bar.update(iteration - self.bar.n)
        self.bar.set_postfix({k: _short(v) for k, v in values.items()}, refresh=False)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def wants_images(self, iteration: int) -> bool:
        return self.enabled and self.image_every > 0 and iteration % self.image_every == 0

    def images(self, iteration: int, frames: torch.Tensor, gt: torch.Tensor, predicted: torch.Tensor,
               max_clips: int = 4) -> None:
        """Grid with one row per clip: its frames, then GT overlays, then predicted overlays.

        frames: normalised (B, T, 3, H, W); gt, predicted: integer id maps (B, T, H, W).
        """
        if not self.enabled:
            return
        frames = frames[:max_clips].detach().float().cpu()
        mean = torch.tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1)
        rgb = (frames * std + mean).clamp(0, 1)
        rows = []
        for clip in range(rgb.shape[0]):
            rows.extend(rgb[clip])
            rows.extend(overlay(rgb[clip], gt[clip].cpu()))
            rows.extend(overlay(rgb[clip], predicted[clip].cpu()))
        grid = image_grid(torch.stack(rows), columns=3 * frames.shape[1])
        self.writer.add_image("train/frames_gt_prediction", grid, iteration)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def overlay(rgb: torch.Tensor, ids: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Blend id colours over (T, 3, H, W) images in [0, 1]; background pixels stay as they are."""
    ids = ids.long()
    colours = _COLOURS[(ids - 1) % len(_COLOURS)].permute(0, 3, 1, 2)  # (T, 3, H, W)
    foreground = (ids > 0).unsqueeze(1)
    return torch.where(foreground, (1 - alpha) * rgb + alpha * colours, rgb)


def image_grid(images: torch.Tensor, columns: int, padding: int = 2) -> torch.Tensor:
    """(N, 3, H, W) images tiled row-major into one (3, H', W') image with white gaps."""
    n, c, h, w = images.shape
    rows = math.ceil(n / columns)
    grid = torch.ones(c, rows * (h + padding) + padding, columns * (w + padding) + padding)
    for index in range(n):
        y = padding + (index // columns) * (h + padding)
        x = padding + (index % columns) * (w + padding)
        grid[:, y:y + h, x:x + w] = images[index]
    return grid


def gpu_memory_gib(device: torch.device) -> float:
    if device.type != "cuda":
        return 0.0
    return torch.cuda.max_memory_allocated(device) / 2**30


def _short(value: float) -> str:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    return f"{value:.3g}" if isinstance(value, float) else str(value)


__all__ = ["TrainingMonitor", "StepTimer", "overlay", "image_grid", "gpu_memory_gib"]
