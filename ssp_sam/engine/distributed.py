"""Process-group plumbing for single-process and ``torchrun`` runs (gloo on CPU, nccl on GPU), and what every
training process sets up first (:func:`start_training_process`, SSP-SAM's and OVSS's trainers)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from ..predictor import resolve_device
from .host_memory import keep_freed_host_memory
from .precision import Precision, flush_denormals, resolve_precision


def prepare_cpu_process() -> None:
    """What a process of ours that computes on the CPU sets first: denormal floats flushed (before any
    parallel operation starts OpenMP's threads, ``precision.flush_denormals``) and freed host memory kept
    for reuse, so large activations do not page-fault (``host_memory.py``)."""
    flush_denormals()
    keep_freed_host_memory()


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


def start_training_process(device: str, precision: str, seed: int) -> tuple[torch.device, Precision, DistInfo]:
    """The device (under ``torchrun`` on CUDA: this process's GPU), precision (``train.precision``; the choice
    and its reason printed once) and process group of a training process; torch's and numpy's RNGs seeded
    with ``seed`` alike on every rank, so that every rank builds the same model (random new modules,
    random test encoders); the trainers seed per rank at every epoch or iteration (:func:`seed_rank_rngs`).

    On a CPU: :func:`prepare_cpu_process`.
    """
    resolved = resolve_device(device)
    if resolved.type == "cpu":
        prepare_cpu_process()
    chosen = resolve_precision(precision, resolved, key="train.precision")
    info = init_distributed(resolved)
    if resolved.type == "cuda":
        resolved = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(resolved)
    if info.is_main:
        tqdm.write(f"precision: {chosen.name} ({chosen.reason})")
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    return resolved, chosen, info


def seed_rank_rngs(seed: int, step: int, rank: int) -> None:
    """Seed torch's and numpy's global RNGs for one epoch (or iteration) ``step`` of process ``rank``.

    Each rank draws its own dropout masks (one stream on every rank would repeat rank 0's masks on
    the other ranks' samples: the release seeds ``seed + rank``), and a resumed run draws what the
    uninterrupted one did from ``step`` on without storing any RNG state.
    """
    torch_seed, numpy_seed = np.random.SeedSequence([seed, step, rank]).generate_state(2)
    torch.manual_seed(int(torch_seed))
    np.random.seed(int(numpy_seed))


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


def logged_terms(window: Sequence[Mapping[str, torch.Tensor]], info: DistInfo) -> list[dict[str, float]]:
    """The loss terms of a window of steps (per step: name -> 0-dim tensor on the device) read back to the
    host in one copy, averaged over ranks: per step ``{"train/<name>": value}`` (the trainers' one sync)."""
    names = sorted(window[0])
    rows = mean_across_ranks(torch.stack([torch.stack([terms[name] for name in names]) for terms in window]), info).tolist()
    return [{f"train/{name}": value for name, value in zip(names, row)} for row in rows]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
