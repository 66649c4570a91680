"""Process-group plumbing for single-process and ``torchrun`` runs (gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment; a no-op otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def mean_across_ranks(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Average a tensor of logged values over ranks (each rank's entry is the mean over its equal share).

    One collective for the whole tensor (e.g. every loss term of a logging window, (steps, terms));
    float64 in the sum, so the mean does not depend on the order of the ranks' values.
    """
    if not info.enabled:
        return values
    summed = values.double()
    dist.all_reduce(summed)
    return summed / info.world_size


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
