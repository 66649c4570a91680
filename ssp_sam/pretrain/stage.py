"""Resumable training stages for the encoder pretrainings: save, stop and continue exactly.

A pretraining is one stage of the default model's recipe (scripts/train_default_model.sh), which
must fit in an hour and survive being stopped. :func:`run_steps` drives the optimisation loop of
either pretraining and keeps a *stage state* beside the output file:

- what is saved: the model, optimizer and schedule state dicts, the numpy Generator that draws all
  batches and prompts, torch's CPU RNG, the number of finished steps and every step's loss. The
  training scenes are not saved: they are a pure function of the seed and are generated again.
- when: every ``save_every`` steps and whenever the loop stops early (``stop_after_steps`` reached,
  ``max_minutes`` used up). Written atomically (temporary file + rename), so a kill at any moment
  leaves the previous complete state; resuming from it replays the steps after it with the same
  random draws, so N steps in one go and N/2 + stop + N/2 give bit-equal weights (same thread count
  and machine).
- how it ends: when all steps are done the caller evaluates, writes its output file (atomically)
  and then removes the state (:func:`remove_state`). A stage is *finished* when its output exists
  and validates; the state file alone is never read by the next stage.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..errors import ConfigError, SSPSAMError, first_line
from ..fileio import atomic_path, write_json
from ..weight_files import read_weights

STATE_SUFFIX = ".resume"  # the stage state lives at "{out}.resume"


@dataclass(frozen=True)
class StageControl:
    """How a stage saves, stops and resumes (the scripts' ``resume`` / ``save_every`` / ``stop_after_steps`` /
    ``max_minutes`` options).

    state_path: the stage state file, or None (nothing saved: tests, notebooks).
    resume: continue from ``state_path`` if it exists (else start afresh).
    save_every: steps between two state saves (a kill loses at most this many steps).
    stop_after_steps: stop, state saved, once this many steps (counted from the stage's start, not
        this session's) are done; None: run to the end.
    max_minutes: stop, state saved, after the step during which this much wall time (this session)
        has passed; None: no limit.
    """

    state_path: Optional[Path] = None
    resume: bool = False
    save_every: int = 100
    stop_after_steps: Optional[int] = None
    max_minutes: Optional[float] = None

    def __post_init__(self) -> None:
        if self.save_every < 1:
            raise ConfigError(f"save_every: must be >= 1, got {self.save_every}")
        if self.stop_after_steps is not None and self.stop_after_steps < 0:
            raise ConfigError(f"stop_after_steps: must be >= 0 or null, got {self.stop_after_steps}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ConfigError(f"max_minutes: must be > 0 or null, got {self.max_minutes}")
        if self.resume and self.state_path is None:
            raise ConfigError("resume=true needs a stage state file (an output path)")

    @classmethod
    def beside(cls, out: str | os.PathLike | None, **options) -> "StageControl":
        """The control of a stage whose output is ``out``: its state at "{out}.resume"."""
        return cls(state_path=None if out is None else Path(f"{os.fspath(out)}{STATE_SUFFIX}"), **options)


@dataclass
class StageProgress:
    """What :func:`run_steps` leaves: every step's loss so far and whether all steps are done."""

    losses: list[float]
    finished: bool


def save_state(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, schedule, rng: np.random.Generator, losses: list[float],
    identity: Optional[Mapping] = None,
) -> None:
    """Write the stage state atomically (plain tensors and containers: loadable with weights_only), with
    the stage's ``identity`` (what its output depends on) for the resume to check."""
    state = {
        "identity": None if identity is None else _as_json(identity),
        "model": {key: tensor.detach().cpu().clone() for key, tensor in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "numpy_rng": rng.bit_generator.state,
        "torch_rng": torch.get_rng_state(),
        "losses": list(losses),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _changed_settings(saved: Mapping, now: Mapping, prefix: str = "") -> list[str]:
    """``key: saved -> now`` for every setting in which two identities differ."""
    changes = []
    for key in sorted(set(saved) | set(now), key=str):
        name = f"{prefix}{key}"
        before, after = saved.get(key), now.get(key)
        if isinstance(before, Mapping) and isinstance(after, Mapping):
            changes += _changed_settings(before, after, f"{name}.")
        elif before != after:
            changes.append(f"{name}: {before!r} -> {after!r}")
    return changes


def load_state(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, schedule, rng: np.random.Generator,
    identity: Optional[Mapping] = None,
) -> list[float]:
    """Restore everything :func:`save_state` wrote, in place; returns the losses of the steps done.

    Raises ConfigError when the state was saved by a stage of another ``identity`` (other settings:
    resuming would mix two recipes in one output), naming what changed."""
    state = read_weights(path, "pretraining stage state")
    saved_identity = state.get("identity") if isinstance(state, Mapping) else None
    if identity is not None and saved_identity is not None and saved_identity != _as_json(identity):
        changed = "; ".join(_changed_settings(saved_identity, _as_json(identity)))
        raise ConfigError(
            f"{path}: the stage was started with other settings ({changed}); resume with its settings, "
            f"or delete the file (or run with resume=false) to start the stage again"
        )
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        return [float(loss) for loss in state["losses"]]
    except (KeyError, RuntimeError, ValueError, TypeError) as error:
        raise ConfigError(
            f"{path}: not the state of this stage ({first_line(error)}); delete it or run with resume=false"
        ) from None


def remove_state(control: StageControl) -> None:
    """Delete the stage state once the stage's output is written (the stage is finished)."""
    if control.state_path is not None and control.state_path.exists():
        control.state_path.unlink()


def run_steps(
    total_steps: int,
    step: Callable[[int], float],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule,
    rng: np.random.Generator,
    control: StageControl,
    description: str,
    progress: bool = True,
    identity: Optional[Mapping] = None,
) -> StageProgress:
    """Run ``step(index)`` (one optimizer step, returning its loss) for the steps not yet done.

    With ``control.resume`` and an existing state file, the model, optimizer, schedule and both
    RNGs are restored first and the loop continues after the last saved step. ``identity`` (what
    the stage's output depends on, as in its report) is saved with the state, and a resume with
    another one is refused.
    """
    losses: list[float] = []
    if control.resume and control.state_path.exists():
        losses = load_state(control.state_path, model, optimizer, schedule, rng, identity)
        if len(losses) > total_steps:
            raise ConfigError(f"{control.state_path}: holds {len(losses)} steps, more than steps={total_steps}")
    started = time.perf_counter()
    bar = tqdm(total=total_steps, initial=len(losses), desc=description, disable=not progress)
    stop_at = total_steps if control.stop_after_steps is None else min(total_steps, control.stop_after_steps)
    saved_at = len(losses)
    while len(losses) < stop_at:
        losses.append(step(len(losses)))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        out_of_time = control.max_minutes is not None and time.perf_counter() - started >= 60 * control.max_minutes
        if control.state_path is not None and (len(losses) % control.save_every == 0 or out_of_time):
            save_state(control.state_path, model, optimizer, schedule, rng, losses, identity)
            saved_at = len(losses)
        if out_of_time:
            break
    bar.close()
    finished = len(losses) == total_steps
    if not finished and control.state_path is not None and saved_at != len(losses):
        save_state(control.state_path, model, optimizer, schedule, rng, losses, identity)
    return StageProgress(losses, finished)


def report_path(out: str | os.PathLike) -> Path:
    """Where a finished stage's report (held-out figures, what it was made with) is written: "{out}.json"."""
    return Path(f"{os.fspath(out)}.json")


def write_report(out: str | os.PathLike, identity: Mapping, results: Mapping) -> None:
    """Write the report of a finished stage, atomically, after its output file."""
    write_json(report_path(out), {"identity": _as_json(identity), "results": _as_json(results)})


def finished_report(out: str | os.PathLike, identity: Mapping, validate: Callable[[Path], object]) -> Optional[dict]:
    """The results of a finished stage, or None when the stage has to run (again).

    Finished means: the output and its report exist, the report was written for this ``identity``
    (architecture and every training setting) and the output passes ``validate`` (e.g. loads into
    the architecture; it raises on a bad file).
    """
    out, report = Path(out), report_path(out)
    if not (out.is_file() and report.is_file()):
        return None
    try:
        saved = json.loads(report.read_text())
        if saved.get("identity") != _as_json(identity):
            return None
        validate(out)
    except (OSError, ValueError, SSPSAMError):
        return None
    return saved["results"]


def _as_json(data: Mapping) -> dict:
    """``data`` as it reads back from JSON (tuples become lists), for comparisons."""
    return json.loads(json.dumps(data))
