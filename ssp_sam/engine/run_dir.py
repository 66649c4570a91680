"""The run directory of a training run (SSP-SAM's and OVSS's trainers): started afresh or resumed exactly.

A kill while ``last/`` or ``best/`` is being replaced leaves the old or the new version under a
side name (``ssp_sam/fileio.py``); a kill while the log is rewritten leaves a temporary file.
:func:`recover_run_dir` repairs both, so ``resume=true`` finds ``last/`` again. :func:`open_run_dir`
does that and checks the run directory against ``resume``; :func:`trainer_state` is what ``last/``
keeps beside the weights for an exact resume and :func:`restore_trainer_state` puts it back;
:func:`append_log` writes the per-step log and :func:`truncate_log` drops its lines of the steps a resumed run
trains again.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import read_trainer_state
from ..errors import ConfigError
from ..fileio import INCOMPLETE, atomic_path, recover_directory
from .distributed import DistInfo, barrier

CHECKPOINTS = ("last", "best")
LOG_FILE = "train_log.jsonl"


def recover_run_dir(run_dir: str | os.PathLike) -> None:
    """Finish or roll back interrupted checkpoint saves in ``run_dir`` and drop unfinished log rewrites.

    Prints one ``note:`` line on stderr per repair. Touches only names this code writes.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    for name in CHECKPOINTS:
        for done in recover_directory(run_dir / name):
            print(f"note: {done}", file=sys.stderr)
    for unfinished in run_dir.glob(f".{LOG_FILE}.*{INCOMPLETE}"):  # fileio.atomic_path's temporaries
        if unfinished.is_file():
            unfinished.unlink()


def open_run_dir(run_dir: Path, resume: bool, dist: DistInfo) -> Path | None:
    """Ready ``run_dir`` for a run; returns its ``last/`` to resume from, or None for a fresh start.

    The main process repairs a save cut short by a crash first (the others wait). A fresh start refuses
    a directory that holds a run and drops the log of an attempt that saved no checkpoint.

    Raises:
        ConfigError: a run there without ``resume``, or ``resume`` with nothing to resume.
    """
    if dist.is_main:
        recover_run_dir(run_dir)
    barrier(dist)
    last = run_dir / "last"
    if last.exists() and not resume:
        raise ConfigError(f"run_dir={run_dir} already holds a run; pass resume=true to continue it or choose another run_dir")
    if not resume:
        if dist.is_main:
            truncate_log(run_dir, before=0)
        return None
    if not last.exists():
        raise ConfigError(f"resume=true but {last} does not exist (nothing to resume)")
    return last


def trainer_state(optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler, **progress: Any) -> dict[str, Any]:
    """What ``last/`` keeps beside the weights (``trainer_state.pt``): optimizer, schedule, gradient scaler,
    torch's RNG and the run's ``progress`` (epoch or iteration, best metric). Tensors and plain containers only."""
    return {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        **progress,
    }


def restore_trainer_state(last: Path, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler) -> dict[str, Any]:
    """Put back what :func:`trainer_state` saved in ``last``; returns the state, for its progress entries."""
    state = read_trainer_state(last)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state["scaler"]:  # empty when the interrupted run used no gradient scaler
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    return state


def append_log(run_dir: Path, records: Sequence[Mapping[str, Any]]) -> None:
    """One JSON line per step in ``<run_dir>/train_log.jsonl`` (plain-text loss curves). Main process only."""
    with open(run_dir / LOG_FILE, "a") as log:
        log.writelines(json.dumps(record) + "\n" for record in records)


def truncate_log(run_dir: Path, before: int, key: str = "epoch") -> None:
    """Keep the lines of ``<run_dir>/train_log.jsonl`` whose ``key`` ("epoch" or "iteration") is below ``before``.

    The steps after the resumed state are trained again and logged anew; ``before=0`` empties the log.
    Lines cut short by the interruption are dropped. Call on the main process only.
    """
    log = run_dir / LOG_FILE
    if not log.exists():
        return
    kept = []
    for line in log.read_text().splitlines():
        try:
            if json.loads(line)[key] < before:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    with atomic_path(log) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))
