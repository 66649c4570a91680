"""The run directory of a training run (SSP-SAM's and OVSS's trainers): started afresh or resumed exactly.

A kill while ``last/`` or ``best/`` is being replaced leaves the old or the new version under a
side name (``ssp_sam/fileio.py``); a kill while the log is rewritten leaves a temporary file.
:func:`recover_run_dir` repairs both, so ``resume=true`` finds ``last/`` again. :func:`open_run_dir`
does that and checks the run directory against ``resume`` and the resumed run's settings against the stored
ones (:func:`check_resumed_settings`); :func:`trainer_state` is what ``last/``
keeps beside the weights for an exact resume and :func:`restore_trainer_state` puts it back;
:func:`append_log` writes the per-step log and :func:`truncate_log` drops its lines of the steps a resumed run
trains again.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import read_config_file, read_trainer_state, stored_mask_target
from ..errors import ConfigError
from ..fileio import INCOMPLETE, atomic_path, recover_directory
from .config_fields import MISSING, lookup
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


# Settings a resumed run may change: they say how and where it runs, not what it trains (a stage
# may run with other threads, time limits or cache sizes, or on another machine). Dotted prefixes.
RESUME_FREE_SETTINGS = (
    "name", "run_dir", "resume", "init_checkpoint", "device", "threads", "cache_dir", "cache_batch_size",
    "train.workers", "train.log_every", "train.max_minutes", "train.save_every", "train.text_cache_gb",
    "train.image_cache_gb", "val.max_batch", "val.overlays", "test", "eval",
)
# Keys added after runs were stored without them, whose default is not what those runs did: the value
# a run that lacks the key trained with (compared on resume as if stored). Other new keys default to the
# old behaviour and are not compared.
BEHAVIOUR_BEFORE_KEY = {
    "model.adapters.text_attention_dropout": 0.0,  # VAD's text-attention dropout came in on 2026-11-28 (7ee4a69)
    "train.schedule": "per_iteration",  # the smooth cosine, before the release's per-epoch one (41eb4bc)
    "train.vocabulary": "all",  # OVSS: every class name was a negative in training until 2026-11-30
}
# Paths, free likewise (the same files on another machine), but each change is printed.
RESUME_PATH_SETTINGS = (
    "model.clip_checkpoint", "model.sam_checkpoint", "dataset.root", "dataset.image_root",
    "ovss_model.clip.checkpoint", "ovss_model.sam.checkpoint", "ovss_dataset.root",
)


def _settings(config: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value of a run config (the dataclass a trainer reads). Dataclass fields and the
    dataset mapping's keys are walked into; any other value (a weight table, a list) is one setting."""
    if is_dataclass(config):
        items = [(item.name, getattr(config, item.name)) for item in fields(config)]
    elif isinstance(config, Mapping) and prefix in ("dataset", "ovss_dataset"):
        items = list(config.items())
    else:
        return {prefix: json.loads(json.dumps(config))}  # as stored in config.json (tuples become lists)
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(_settings(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _under(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == prefix or key.startswith(prefix + ".") for prefix in prefixes)


def check_resumed_settings(last: Path, config: Any, notes: bool = True) -> None:
    """Refuse to resume ``last`` with settings that would train something else than the run did.

    ``config`` is the resumed run's config (the dataclass whose ``to_dict()`` every checkpoint
    stores as ``run``). A key absent from the stored run is newer than the run and not compared
    (new keys default to the old behaviour), unless ``BEHAVIOUR_BEFORE_KEY`` says what the run did
    without it. Prints a note per changed path (``notes``: on one rank only).

    Raises:
        ConfigError: naming every other changed key with the run's and the new value.
    """
    config_path, stored = read_config_file(last)
    if not isinstance(stored, Mapping) or not isinstance(stored.get("run"), Mapping):
        raise ConfigError(f"{config_path}: no 'run' section, so the run's settings cannot be checked before resuming it")
    run = dict(stored["run"])
    if isinstance(run.get("model"), Mapping):  # a run of before model.mask_target: its train.mask_target
        run["model"] = {**run["model"], "mask_target": stored_mask_target(stored)}
    changed = {}
    for key, value in _settings(config).items():
        before = lookup(run, key)  # MISSING: a key newer than the run
        if before is MISSING:
            before = BEHAVIOUR_BEFORE_KEY.get(key, MISSING)
        if before is not MISSING and before != value and not _under(key, RESUME_FREE_SETTINGS):
            changed[key] = (before, value)
    for key in [key for key in changed if _under(key, RESUME_PATH_SETTINGS)]:
        before, value = changed.pop(key)
        if notes:
            print(f"note: resuming with {key}={value} (the run had {before})", file=sys.stderr)
    if changed:
        listed = "; ".join(f"{key}: {before!r} -> {value!r}" for key, (before, value) in changed.items())
        raise ConfigError(
            f"resume=true: {last} was trained with other settings ({listed}); resume with the run's own settings, "
            f"or start a new run from its weights (another name and init_checkpoint={last})"
        )


def open_run_dir(run_dir: Path, resume: bool, dist: DistInfo, config: Any = None) -> Path | None:
    """Ready ``run_dir`` for a run; returns its ``last/`` to resume from, or None for a fresh start.

    The main process repairs a save cut short by a crash first (the others wait). A fresh start refuses
    a directory that holds a run and drops the log of an attempt that saved no checkpoint. A resume
    checks ``config`` (the trainer's run config; None: not checked) against the run's own settings.

    Raises:
        ConfigError: a run there without ``resume``, ``resume`` with nothing to resume, or with
            settings that change what the run trains.
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
    if config is not None:
        check_resumed_settings(last, config, notes=dist.is_main)
    return last


def trainer_state(optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler, **progress: Any) -> dict[str, Any]:
    """What ``last/`` keeps beside the weights (``trainer_state.pt``): optimizer, schedule, gradient scaler
    and the run's ``progress`` (epoch or iteration, best metric). Tensors and plain containers only. (No RNG
    state: the trainers seed every epoch or iteration from the run's seed, ``distributed.seed_rank_rngs``.)"""
    return {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        **progress,
    }


def restore_trainer_state(last: Path, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler) -> dict[str, Any]:
    """Put back what :func:`trainer_state` saved in ``last``; returns the state, for its progress entries."""
    state = read_trainer_state(last)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state["scaler"]:  # empty when the interrupted run used no gradient scaler
        scaler.load_state_dict(state["scaler"])
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
