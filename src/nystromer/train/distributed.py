"""Process-group helpers: one code path for a single process and for ``torchrun`` workers."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "init_from_env",
    "shutdown",
    "resolve_device",
    "all_reduce_sum",
    "gather_objects",
]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: ``rank`` of ``world_size``, ``local_rank`` on its host."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0, the only process that writes files and shows progress."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @staticmethod
    def current() -> DistInfo:
        """The running process group's layout, or a single process when there is none."""
        if dist.is_available() and dist.is_initialized():
            return DistInfo(
                dist.get_rank(),
                dist.get_world_size(),
                int(os.environ.get("LOCAL_RANK", dist.get_rank())),
            )
        return DistInfo()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def resolve_device(device: str, info: DistInfo | None = None) -> torch.device:
    """``"auto"`` → CUDA when available else CPU; under ``torchrun`` plain ``"cuda"`` means
    the GPU of this process's local rank.

    Raises:
        ValueError: a CUDA device was asked for but CUDA is not available.
    """
    info = info or DistInfo.current()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} was requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", info.local_rank if info.enabled else 0)
        torch.cuda.set_device(dev)
    return dev


def init_from_env(device: str = "auto") -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    ``WORLD_SIZE`` > 1 starts a group (NCCL when training on CUDA, gloo on CPU); without it,
    or with an already initialised group, nothing changes.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dist.is_available() and not dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        wants_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        if wants_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if wants_cuda else "gloo")
    return DistInfo.current()


def shutdown(*, synchronize: bool = True) -> None:
    """Leave the process group, if one is running.

    Args:
        synchronize: wait for every process first (after a normal finish). Without it one
            process can tear down its gloo connections while another still uses them, which
            aborts that process ("terminate called without an active exception"). False after
            an error, when the other processes may never arrive.
    """
    if dist.is_available() and dist.is_initialized():
        # A DistributedDataParallel wrapper that has gone out of scope but sits in a reference
        # cycle still holds the group; collected later (at interpreter exit, at worst) it tears
        # gloo's threads down after the group is gone and aborts the process.
        gc.collect()
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over all processes (in place); identity for a single process."""
    if info.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every process's ``obj``, in rank order (a one-element list for a single process)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out
