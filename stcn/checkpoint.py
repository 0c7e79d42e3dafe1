"""Training checkpoints: atomic writes, retention, `--resume auto`, RNG states.

A checkpoint is one `torch.save`d dict written to a temporary file in the run directory,
fsynced, then renamed over its final name (and the directory fsynced), so a crash mid-write
leaves the previous checkpoints intact. Files are `checkpoint_<iteration>.pt`; the newest
`keep_last` are kept, plus every checkpoint whose iteration is a multiple of
`snapshot_every` (permanent snapshots). Resuming picks the newest checkpoint that loads.
"""

from __future__ import annotations

import random
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from stcn.weights import atomic_torch_save

CHECKPOINT_PATTERN = re.compile(r"^checkpoint_(\d+)\.pt$")


def capture_rng_states() -> dict[str, Any]:
    """Global RNG states of python, numpy, torch (CPU) and every CUDA device."""
    states = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: Mapping[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        cuda_states = states["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain network inside DDP / torch.compile / our own forward wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif hasattr(model, "module"):  # DistributedDataParallel
            model = model.module
        elif hasattr(model, "wrapped_network"):  # trainer's forward wrapper
            model = model.wrapped_network
        else:
            return model


class CheckpointManager:
    """Writes, prunes and finds the checkpoints of one run directory."""

    def __init__(self, run_dir: str | Path, keep_last: int = 3, snapshot_every: int = 0):
        if keep_last < 1:
            raise ValueError("keep_last must be at least 1 (the resume point)")
        self.run_dir = Path(run_dir)
        self.keep_last = keep_last
        self.snapshot_every = snapshot_every

    def path_for(self, iteration: int) -> Path:
        return self.run_dir / f"checkpoint_{iteration:09d}.pt"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(iteration, path) of every checkpoint file, oldest first."""
        if not self.run_dir.is_dir():
            return []
        found = []
        for entry in self.run_dir.iterdir():
            match = CHECKPOINT_PATTERN.match(entry.name)
            if match:
                found.append((int(match.group(1)), entry))
        return sorted(found)

    def save(self, state: Mapping[str, Any], iteration: int) -> Path:
        path = self.path_for(iteration)
        atomic_torch_save(dict(state), path)
        self.prune()
        return path

    def prune(self) -> None:
        existing = self.checkpoints()
        recent = {iteration for iteration, _ in existing[-self.keep_last:]}
        for iteration, path in existing:
            snapshot = self.snapshot_every > 0 and iteration % self.snapshot_every == 0
            if iteration not in recent and not snapshot:
                path.unlink(missing_ok=True)

    def load_latest(self, map_location: Any = "cpu") -> tuple[dict[str, Any], Path] | None:
        """The newest checkpoint that loads, skipping (with a warning) corrupt ones."""
        for _, path in reversed(self.checkpoints()):
            try:
                return load_checkpoint(path, map_location), path
            except Exception as error:  # a truncated or corrupt file: fall back to an older one
                warnings.warn(f"skipping unreadable checkpoint {path}: {error}")
        return None

    def resolve(self, resume: str | None, map_location: Any = "cpu") -> tuple[dict[str, Any], Path] | None:
        """`--resume` semantics: None/'' -> fresh start, 'auto' -> newest valid, else that file."""
        if not resume:
            return None
        if resume == "auto":
            return self.load_latest(map_location)
        path = Path(resume)
        if not path.is_file():
            raise FileNotFoundError(f"--resume {resume}: no such checkpoint file (or use --resume auto)")
        return load_checkpoint(path, map_location), path


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    # Checkpoints hold RNG states and loader positions (numpy/python objects), so they are
    # loaded with weights_only=False: only load checkpoints your own runs wrote.
    state = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(state, dict) or "iteration" not in state or "model" not in state:
        raise ValueError(f"{path} is not a training checkpoint (expected model and iteration)")
    return state


__all__ = [
    "CheckpointManager", "capture_rng_states",
    "restore_rng_states", "unwrap_model", "load_checkpoint",
]
