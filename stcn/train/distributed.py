"""Process placement from torchrun's environment: device, rank and world size.

torchrun (one per node, e.g. under `srun`) sets RANK, WORLD_SIZE and LOCAL_RANK for every
worker. The device comes from LOCAL_RANK (GPU index on this node); the data split comes
from RANK/WORLD_SIZE, so multi-node runs need nothing more. Without torchrun the trainer is
one process with no process group (rank 0 of 1). The backend is NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_device(name: str | torch.device | None = "auto", local_rank: int | None = None) -> torch.device:
    """The torch device of a `--device` value: "auto"/None is CUDA when available, else the
    CPU; "cuda" is GPU `local_rank` when given (torchrun's LOCAL_RANK), "cuda:N" GPU N, "cpu"
    the CPU. Asking for CUDA where there is none is a ValueError that says what to use."""
    if name is None or name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device (cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here (use --device cpu or auto)")
        if device.index is None and local_rank is not None:
            device = torch.device("cuda", local_rank)
    return device


def init_distributed(device: str | None = None, timeout_minutes: int = 30) -> DistributedContext:
    """Read torchrun's environment, pick the device and join the process group if launched by it.

    device: "cuda", "cuda:N", "cpu", or "auto"/None (CUDA when available). With "cuda" the GPU
    is LOCAL_RANK.
    """
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    torch_device = resolve_device(device, local_rank)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ
    if launched and not dist.is_initialized():
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend, rank=rank, world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    elif world_size > 1 and not launched:
        raise RuntimeError(f"WORLD_SIZE={world_size} but no MASTER_ADDR: "
                           "launch multi-process runs with torchrun")
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over all ranks (identity in a single process)."""
    if dist.is_available() and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= dist.get_world_size()
    return values


def all_reduce_mean_named(values: Mapping[str, torch.Tensor | float],
                          device: torch.device) -> dict[str, float]:
    """Mean over all ranks of named scalars, in one collective.

    The scalars travel as one tensor stacked in sorted-name order, the same on every rank
    whatever order each rank built its dict in; the result keeps the dict's own order.
    """
    names = sorted(values)
    stacked = torch.stack([torch.as_tensor(values[name]).detach().to(device, torch.float32).reshape(())
                           for name in names]) if names else torch.zeros(0, device=device)
    reduced = dict(zip(names, all_reduce_mean(stacked).cpu().tolist()))
    return {name: reduced[name] for name in values}


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when `flag` is true on at least one rank, so all ranks take the same decision."""
    if dist.is_available() and dist.is_initialized():
        value = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)
    return flag


__all__ = ["DistributedContext", "resolve_device", "init_distributed", "cleanup", "barrier",
           "all_reduce_mean", "all_reduce_mean_named", "any_rank"]
