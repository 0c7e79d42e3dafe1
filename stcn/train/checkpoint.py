"""Training checkpoints: atomic writes, retention, `--resume auto`, RNG states.

A checkpoint is one `torch.save`d dict written to a temporary file in the run directory,
fsynced, then renamed over its final name (and the directory fsynced), so a crash mid-write
leaves the previous checkpoints intact. Files are `checkpoint_<iteration>.pt`; the newest
`keep_last` are kept, plus every checkpoint whose iteration is a multiple of
`snapshot_every` (permanent snapshots). Resuming picks the newest checkpoint that loads.

Checkpoints are untrusted input: they are read with `torch.load(weights_only=True)`, so a
crafted pickle cannot run code. What they hold besides tensors is plain data (RNG states
as tensors and ints); the three numpy names that checkpoints written before this format
need (an MT19937 key array) are allow-listed, nothing else.

Nothing is discarded silently: an unreadable checkpoint is renamed `<name>.unreadable`
(with a warning) and no longer counts toward `keep_last`; when checkpoints exist but none
loads, resuming stops with an error listing them; a fresh start (`--resume none`) in a run
directory that holds checkpoints moves them into `superseded-<time>/`.
"""

from __future__ import annotations

import pickle
import random
import re
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from shards.storage import temp_target

from stcn.model.weights import atomic_torch_save

CHECKPOINT_PATTERN = re.compile(r"^checkpoint_(\d+)\.pt$")
UNREADABLE_SUFFIX = ".unreadable"
#: 2: RNG states as tensors and plain types (loads with weights_only=True and nothing else).
FORMAT_VERSION = 2
# Checkpoints of format 1 pickled numpy's MT19937 state as an ndarray; these names rebuild
# exactly that (an array of a plain dtype) and nothing that can run code.
_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's array rebuilder
_LEGACY_NUMPY_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)),
                         (_RECONSTRUCT, "numpy._core.multiarray._reconstruct"),
                         (_RECONSTRUCT, "numpy.core.multiarray._reconstruct")]


class CheckpointError(ValueError):
    """A checkpoint cannot be used (the message names the file, why, and what to do)."""


def capture_rng_states() -> dict[str, Any]:
    """Global RNG states of python, numpy, torch (CPU) and every CUDA device, as tensors
    and plain types (loadable with weights_only=True)."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    states = {
        "python": random.getstate(),  # (int, tuple of ints, float or None)
        "numpy": (str(name), torch.from_numpy(keys.astype(np.int64)), int(position),
                  int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: Mapping[str, Any]) -> None:
    random.setstate(states["python"])
    name, keys, *rest = states["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((name, keys.astype(np.uint32), *rest))
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

    def __init__(self, run_dir: str | Path, keep_last: int = 3, snapshot_every: int = 0,
                 log=print):
        if keep_last < 1:
            raise ValueError("keep_last must be at least 1 (the resume point)")
        self.run_dir = Path(run_dir)
        self.keep_last = keep_last
        self.snapshot_every = snapshot_every
        self.log = log

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

    def unreadable(self) -> list[Path]:
        """Checkpoints moved aside as unreadable (kept for the user to inspect)."""
        if not self.run_dir.is_dir():
            return []
        return sorted(p for p in self.run_dir.iterdir() if p.name.endswith(UNREADABLE_SUFFIX))

    def save(self, state: Mapping[str, Any], iteration: int) -> Path:
        path = self.path_for(iteration)
        atomic_torch_save({**state, "format": FORMAT_VERSION}, path)
        self.prune(keep=path)
        return path

    def prune(self, keep: Path | None = None) -> None:
        """Delete all but the newest `keep_last` and the snapshots (never `keep`, the file
        just written). Only files named like checkpoints count: unreadable ones were moved
        aside, so they never push a good checkpoint out."""
        existing = self.checkpoints()
        recent = {iteration for iteration, _ in existing[-self.keep_last:]}
        for iteration, path in existing:
            snapshot = self.snapshot_every > 0 and iteration % self.snapshot_every == 0
            if iteration not in recent and not snapshot and path != keep:
                path.unlink(missing_ok=True)

    def remove_stale_temps(self) -> list[Path]:
        """Delete temporary files a killed checkpoint save left behind (our own naming
        pattern only: `.checkpoint_*.pt.tmp-*`, `.stcn_stage*.pth.tmp-*`)."""
        removed = []
        if not self.run_dir.is_dir():
            return removed
        for entry in self.run_dir.iterdir():
            target = temp_target(entry.name)
            if target and (CHECKPOINT_PATTERN.match(target) or re.fullmatch(r"stcn_stage\d\.pth", target)):
                size = entry.stat().st_size
                entry.unlink(missing_ok=True)
                removed.append(entry)
                self.log(f"removed {entry} ({size / 1e6:.1f} MB), left by a save that was killed")
        return removed

    def move_aside(self, path: Path, why: str) -> Path:
        aside = path.with_name(path.name + UNREADABLE_SUFFIX)
        number = 1
        while aside.exists():
            aside = path.with_name(f"{path.name}.{number}{UNREADABLE_SUFFIX}")
            number += 1
        path.rename(aside)
        warnings.warn(f"skipping unreadable checkpoint {path} ({why}); moved it aside to {aside.name}",
                      stacklevel=2)
        return aside

    def supersede(self) -> Path | None:
        """A fresh start in a run directory holding checkpoints: move them (readable or not)
        into `superseded-<UTC time>/`, so that `--resume auto` later continues the new run
        and nothing of the old one is lost."""
        old = [p for _, p in self.checkpoints()] + self.unreadable()
        if not old:
            return None
        target = self.run_dir / time.strftime("superseded-%Y%m%dT%H%M%SZ", time.gmtime())
        target.mkdir(exist_ok=True)
        for path in old:
            path.rename(target / path.name)
        self.log(f"fresh start (--resume none): moved {len(old)} earlier checkpoint(s) to {target}")
        return target

    def load_latest(self, map_location: Any = "cpu", move_aside: bool = True
                    ) -> tuple[dict[str, Any], Path] | None:
        """The newest checkpoint that loads; unreadable newer ones are moved aside with a
        warning. None when the run directory has no checkpoint at all; CheckpointError when
        it has some (or moved-aside ones) and none loads."""
        failed = []
        for _, path in reversed(self.checkpoints()):
            try:
                return load_checkpoint(path, map_location), path
            except (CheckpointError, OSError) as error:  # fall back to an older one
                why = str(error).removeprefix(f"{path}: ")
                failed.append(f"{path.name} ({why})")
                # a damaged file is moved aside; one we may not read (permissions, I/O) is
                # only reported: it may be fine
                if move_aside and isinstance(error, CheckpointError) and path.exists():
                    self.move_aside(path, why)
        earlier = [f"{p.name} (moved aside earlier)" for p in self.unreadable()
                   if p.name.split(".pt")[0] + ".pt" not in {f.split(" ")[0] for f in failed}]
        if failed or earlier:
            raise CheckpointError(
                f"{self.run_dir}: no checkpoint loads: " + "; ".join(failed + earlier)
                + ". To start this run over, pass --resume none (earlier checkpoints are "
                "moved into a superseded-* folder, not deleted); to continue from a "
                "particular file, pass --resume PATH")
        return None

    def resolve(self, resume: str | None, map_location: Any = "cpu", is_main: bool = True
                ) -> tuple[dict[str, Any], Path] | None:
        """`--resume` semantics: None/'' -> fresh start, 'auto' -> newest valid, else that file.
        Stale temporary files of killed saves are removed first (by the main process)."""
        if is_main:
            self.remove_stale_temps()
        if not resume:
            if is_main:
                self.supersede()
            return None
        if resume == "auto":
            return self.load_latest(map_location, move_aside=is_main)
        path = Path(resume)
        if not path.is_file():
            raise FileNotFoundError(f"--resume {resume}: no such checkpoint file (or use --resume auto)")
        return load_checkpoint(path, map_location), path


def _why_unreadable(error: Exception, head: bytes = b"PK") -> str:
    """A short reason for a checkpoint that torch.load(weights_only=True) refused; `head`:
    the file's first bytes (torch.save writes a zip archive)."""
    text = str(error)
    blocked = re.search(r"unsupported GLOBAL (\S+)", text, re.IGNORECASE)
    if blocked:
        return (f"it holds a Python object ({blocked.group(1).rstrip('.')}) that could run code when "
                "loaded, so it was refused unopened; load only checkpoints written by this "
                "project")
    if not head:
        return "empty (0 bytes); was a save interrupted by something that bypassed the atomic write?"
    if "Unsupported operand" in text or isinstance(error, pickle.UnpicklingError) \
            or not head.startswith(b"PK"):
        return ("not a PyTorch checkpoint (a foreign or damaged pickle), refused without "
                "running it")
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return (f"truncated or corrupt ({first.split('. ')[0]}); was a save interrupted "
            "by something that bypassed the atomic write?")


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a training checkpoint without running any code it may carry (weights_only).

    Raises CheckpointError naming the file and why it cannot be used."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_LEGACY_NUMPY_GLOBALS), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # foreign files
            state = torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise
    except Exception as error:  # torch raises many types for corrupt or foreign files
        with open(path, "rb") as f:
            head = f.read(4)
        raise CheckpointError(f"{path}: {_why_unreadable(error, head)}") from error
    if not isinstance(state, dict) or "iteration" not in state or "model" not in state:
        raise CheckpointError(f"{path}: not a training checkpoint of this project "
                              "(expected a dict with model and iteration)")
    return state


__all__ = [
    "CheckpointManager", "CheckpointError", "FORMAT_VERSION", "capture_rng_states",
    "restore_rng_states", "unwrap_model", "load_checkpoint",
]
