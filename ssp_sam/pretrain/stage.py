"""Resumable training stages for the encoder pretrainings: save, stop and continue exactly.

A pretraining is one stage of the default model's recipe (scripts/train_default_model.sh), which
must fit in an hour and survive being stopped. :func:`run_steps` drives the optimisation loop of
either pretraining and keeps a *stage state* beside the output file:

- what is saved: the model, optimizer and schedule state dicts, the numpy Generator that draws all
  batches and prompts, torch's CPU RNG, the number of finished steps and every step's loss. The
  training scenes are not saved: they are a pure function of the seed and are generated again.
- when: every ``save_every`` steps and whenever the loop stops early (``stop_after_steps`` reached,
  ``max_minutes`` used up) with steps done since the last save. Written atomically (temporary file +
  rename), so a kill at any moment leaves the previous complete state; resuming from it replays the
  steps after it with the same random draws, so N steps in one go and N/2 + stop + N/2 give
  bit-equal weights (same thread count and machine).
- how it ends: when all steps are done the caller evaluates and :func:`finish_stage` writes the
  output file and its report (each atomically) and removes the state. A stage is *finished* when its
  report names this stage and the sha256 of the output file beside it, and the output validates
  (:func:`finished_report`); the state file alone is never read by the next stage.
- before any slow set-up (the scene pool) the caller checks where it will write
  (:func:`prepare_stage_files`, which also deletes this stage's own unfinished temporary files left by
  a kill during a save) and reads the state to resume (:func:`read_state`), so that a state of other
  settings or an unreadable one is refused at once.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from glob import escape
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..engine.config_fields import check_field_types, check_fields, number
from ..errors import ConfigError, SSPSAMError, first_line
from ..fileio import INCOMPLETE, atomic_path, file_sha256, write_json
from ..outputs import check_output_file
from ..weight_files import read_weights

STATE_SUFFIX = ".resume"  # the stage state lives at "{out}.resume"
STATE_KEYS = ("model", "optimizer", "schedule", "numpy_rng", "torch_rng", "losses")  # what save_state writes besides the identity


def check_settings(settings: Any) -> None:
    """Types and ranges of a settings dataclass whose numeric fields are ``config_fields.number``s.

    The values come straight from the command line, so their types are checked first
    (``config_fields.check_field_types``); the ranges are the trainer's check (``check_fields``), which
    keeps out what would train backwards or not at all (a negative learning rate or loss weight is
    gradient ascent).

    Raises:
        ConfigError: one line naming the first bad field and its value (``lr=abc: must be a number >= 0``).
    """
    check_field_types(settings)
    check_fields("", settings, asdict(settings))


@dataclass(frozen=True)
class StageControl:
    """How a stage saves, stops and resumes (the scripts' ``resume`` / ``save_every`` / ``stop_after_steps`` /
    ``max_minutes`` options).

    state_path: the stage state file, or None (nothing saved: tests, notebooks).
    resume: continue from ``state_path`` if it exists (else start afresh).
    save_every: steps between two state saves (a kill loses at most this many steps).
    stop_after_steps: stop, state saved, once this many steps (counted from the stage's start, not
        this session's) are done (0 on a fresh stage: no step, nothing saved); None: run to the end.
    max_minutes: stop, state saved, after the step during which this much wall time (this session)
        has passed; None: no limit.
    """

    state_path: Optional[Path] = None
    resume: bool = False
    save_every: int = number(100, 1)
    stop_after_steps: Optional[int] = number(None, 0, optional=True)
    max_minutes: Optional[float] = number(None, 0, optional=True, above=True)

    def __post_init__(self) -> None:
        check_settings(self)
        if self.resume and self.state_path is None:
            raise ConfigError("resume=true needs a stage state file (an output path)")

    @classmethod
    def beside(cls, out: str | os.PathLike | None, **options) -> "StageControl":
        """The control of a stage whose output is ``out``: its state at "{out}.resume"."""
        return cls(state_path=None if out is None else Path(f"{os.fspath(out)}{STATE_SUFFIX}"), **options)


@dataclass
class StageProgress:
    """What :func:`run_steps` leaves: every step's loss so far, whether all steps are done and, when
    not, whether the state file holds them (no step done, or no state path: nothing was saved)."""

    losses: list[float]
    finished: bool
    state_saved: bool = False


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


def read_state(control: StageControl, identity: Optional[Mapping], total_steps: int) -> Optional[dict]:
    """The state to resume from (``control.resume`` and the file exists), checked, or None (start afresh).

    Called before the stage's slow set-up (generating the scene pool takes minutes), so that a state
    that cannot be resumed is refused at once. Raises ConfigError (CheckpointError for a file that is
    no torch file) when the state was saved by a stage of another ``identity`` (other settings:
    resuming would mix two recipes in one output), naming what changed, when it is not a stage state,
    or when it holds more steps than ``total_steps``."""
    if not (control.resume and control.state_path is not None and control.state_path.exists()):
        return None
    path = control.state_path
    state = read_weights(path, "pretraining stage state")
    if not isinstance(state, Mapping) or any(key not in state for key in STATE_KEYS) or not isinstance(state["losses"], list):
        raise ConfigError(f"{path}: not the state of a pretraining stage; delete it or run with resume=false")
    saved_identity = state.get("identity")
    if identity is not None and saved_identity is not None and saved_identity != _as_json(identity):
        changed = "; ".join(_changed_settings(saved_identity, _as_json(identity)))
        raise ConfigError(
            f"{path}: the stage was started with other settings ({changed}); resume with its settings, "
            f"or delete the file (or run with resume=false) to start the stage again"
        )
    if len(state["losses"]) > total_steps:
        raise ConfigError(f"{path}: holds {len(state['losses'])} steps, more than steps={total_steps}")
    return dict(state)


def restore_state(
    state: Mapping, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, schedule, rng: np.random.Generator
) -> list[float]:
    """Put everything :func:`save_state` wrote (as :func:`read_state` returned it) back, in place; returns
    the losses of the steps done."""
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
    state: Optional[Mapping] = None,
) -> StageProgress:
    """Run ``step(index)`` (one optimizer step, returning its loss) for the steps not yet done.

    With ``control.resume`` and an existing state file, the model, optimizer, schedule and both
    RNGs are restored first and the loop continues after the last saved step. ``state``: that file as
    :func:`read_state` already returned it (the stages read it before their slow set-up); None: read
    here. ``identity`` (what the stage's output depends on, as in its report) is saved with the state,
    and a resume with another one is refused.
    """
    if state is None:
        state = read_state(control, identity, total_steps)
    losses: list[float] = []
    state_holds = None  # how many steps the state file holds (None: no file of this stage's run)
    if state is not None:
        losses = restore_state(state, control.state_path, model, optimizer, schedule, rng)
        state_holds = len(losses)
    started = time.perf_counter()
    bar = tqdm(total=total_steps, initial=len(losses), desc=description, disable=not progress)
    stop_at = total_steps if control.stop_after_steps is None else min(total_steps, control.stop_after_steps)
    while len(losses) < stop_at:
        losses.append(step(len(losses)))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        out_of_time = control.max_minutes is not None and time.perf_counter() - started >= 60 * control.max_minutes
        if control.state_path is not None and (len(losses) % control.save_every == 0 or out_of_time):
            save_state(control.state_path, model, optimizer, schedule, rng, losses, identity)
            state_holds = len(losses)
        if out_of_time:
            break
    bar.close()
    finished = len(losses) == total_steps
    # Stopped before the end: save what was done. No step done on a fresh start: nothing to save (a
    # rerun starts the same way), and the caller must not claim a state.
    if not finished and control.state_path is not None and losses and state_holds != len(losses):
        save_state(control.state_path, model, optimizer, schedule, rng, losses, identity)
        state_holds = len(losses)
    return StageProgress(losses, finished, state_saved=state_holds is not None and state_holds == len(losses))


def stopped_state(state_saved: bool, control: StageControl) -> str:
    """How a stage stopped before its end can go on, for the scripts' last line: it names a state file
    only when one holds the steps done."""
    if state_saved:
        return f"state saved to {control.state_path}: rerun with resume=true"
    if control.state_path is None:
        return "no state saved (out=null: nothing is written)"
    return "no step was done and no state saved"


def prepare_stage_files(out: str | os.PathLike | None, control: StageControl) -> None:
    """Check, before any work, that the stage can write its output, report and state, and delete the
    unfinished temporary files of its own earlier saves.

    A stage learns that ``out`` is a directory only when it saves, after all its training; and a
    kill during a save leaves ``fileio.atomic_path``'s temporary ``.{name}.<8 characters>.tmp`` beside
    the file for good (megabytes each), as the SSP-SAM trainer's run directory repair also deletes its
    own (``engine/run_dir.py``). Only those names of the output, its report and its state are touched.

    Raises:
        ConfigError: naming ``out`` when one of the three paths cannot be written.
    """
    paths = [] if out is None else [Path(out), report_path(out)]
    if control.state_path is not None:
        paths.append(control.state_path)
    for path in paths:
        check_output_file(path, "out")
    for path in paths:
        prefix = f".{path.name}."
        for entry in path.parent.glob(f"{escape(prefix)}*{INCOMPLETE}"):
            token = entry.name[len(prefix) : -len(INCOMPLETE)]
            if token and "." not in token and entry.is_file() and not entry.is_symlink():
                entry.unlink(missing_ok=True)


def report_path(out: str | os.PathLike) -> Path:
    """Where a finished stage's report (held-out figures, what it was made with) is written: "{out}.json"."""
    return Path(f"{os.fspath(out)}.json")


def write_report(out: str | os.PathLike, identity: Mapping, results: Mapping) -> None:
    """Write the report of a finished stage, atomically, after its output file, with the output's
    sha256: the report vouches for those bytes only (:func:`finished_report`)."""
    write_json(report_path(out), {"identity": _as_json(identity), "sha256": file_sha256(out), "results": _as_json(results)})


def add_to_report(out: str | os.PathLike, key: str, value: Any) -> None:
    """Add ``results[key] = value`` to the report of a finished stage, atomically: figures computed
    after the report was written (the held-out figures on a fresh seed). The report still vouches for
    the same output bytes."""
    path = report_path(out)
    saved = json.loads(path.read_text())
    saved["results"][key] = _as_json({key: value})[key]
    write_json(path, saved)


def finish_stage(
    out: str | os.PathLike, save: Callable[[Path], None], identity: Mapping, results: Mapping, control: StageControl
) -> None:
    """Write a finished stage's output with ``save(out)``, then its report, then delete its state.

    The old report goes first: a death after the new weights are in place but before their report
    is written must not leave the previous run's report beside them, which would pass the new
    weights off as the old settings' finished output.
    """
    report_path(out).unlink(missing_ok=True)
    save(Path(out))
    write_report(out, identity, results)
    remove_state(control)


def _report_vouches_for(saved: Mapping, out: Path, report: Path) -> bool:
    """Whether the report ``saved`` was written for the bytes ``out`` holds now; prints a note when not.

    Reports hold the sha256 of their output. A report written before they did has none; the code
    that wrote it saved the weights first and the report after them, so such a report is taken only
    when it is not older than the weights (replaced weights beside a stale report are newer than it).
    """
    recorded = saved.get("sha256")
    if recorded is None:
        if report.stat().st_mtime_ns >= out.stat().st_mtime_ns:
            return True
        reason = "is older than the weights (they were replaced after it was written)"
    elif file_sha256(out) == recorded:
        return True
    else:
        reason = "was written for other weights (sha256 differs)"
    print(f"note: {report} {reason}: {out} is not taken as this stage's finished output; the stage runs", file=sys.stderr)
    return False


def finished_report(out: str | os.PathLike, identity: Mapping, validate: Callable[[Path], object]) -> Optional[dict]:
    """The results of a finished stage, or None when the stage has to run (again).

    Finished means: the output and its report exist, the report was written for this ``identity``
    (architecture and every training setting) and for the bytes the output holds (its sha256), and
    the output passes ``validate`` (e.g. loads into the architecture; it raises on a bad file).
    Weights that do not match their report are not finished (a note says so): the stage then runs as
    usual, resuming only a state of this identity, and writes its own output and report; that is
    safe, whereas refusing would leave the user to delete a file the stage owns.
    """
    out, report = Path(out), report_path(out)
    if not (out.is_file() and report.is_file()):
        return None
    try:
        saved = json.loads(report.read_text())
        if not isinstance(saved, dict) or saved.get("identity") != _as_json(identity) or "results" not in saved:
            return None
        if not _report_vouches_for(saved, out, report):
            return None
        validate(out)
    except (OSError, ValueError, SSPSAMError):
        return None
    return saved["results"]


def _as_json(data: Mapping) -> dict:
    """``data`` as it reads back from JSON (tuples become lists), for comparisons."""
    return json.loads(json.dumps(data))
