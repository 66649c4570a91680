"""What scripts/pretrain_clip.py and scripts/pretrain_sam.py share: their start and their last line.

Both scripts read their settings from the Hydra config's keys of the same names, run one resumable
stage (:mod:`ssp_sam.pretrain.stage`) and end with one line saying what was done: a stage stopped
before its last step exits with :data:`EXIT_STOPPED`.
"""

from __future__ import annotations

import sys
from dataclasses import fields
from typing import Any, Callable, Mapping, Optional, Protocol, TypeVar

import torch

from ..engine.distributed import prepare_cpu_process
from ..errors import ConfigError
from ..predictor import resolve_device
from .stage import StageControl, add_to_report, stopped_state

EXIT_STOPPED = 3  # stopped before the last step; the state (if a step was done) is saved, resume=true continues

Settings = TypeVar("Settings")


class StageResult(Protocol):
    losses: list[float]
    seconds: float
    finished: bool
    state_saved: bool


def settings_from(cfg: Any, settings_type: type[Settings]) -> Settings:
    """The stage's settings from ``cfg``'s keys named as ``settings_type``'s fields (typed and ranged there).

    Raises:
        ConfigError: a bad setting (one line naming the key).
    """
    return settings_type(**{field.name: cfg[field.name] for field in fields(settings_type)})


def start_stage(cfg: Any, settings_type: type[Settings]) -> tuple[torch.device, Settings, StageControl]:
    """Checks ``cfg.threads``, chooses ``cfg.device`` (preparing a CPU process) and sets the thread count,
    then builds the settings from ``cfg``'s keys named as ``settings_type``'s fields (typed and ranged
    there) and the stage control beside ``cfg.out``, all before any slow work.

    Raises:
        ConfigError: a bad ``threads``, device or setting (one line naming the key).
    """
    if isinstance(cfg.threads, bool) or not isinstance(cfg.threads, int) or cfg.threads < 1:
        raise ConfigError(f"threads={cfg.threads}: must be an integer >= 1")
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        prepare_cpu_process()
    torch.set_num_threads(cfg.threads)
    settings = settings_from(cfg, settings_type)
    control = StageControl.beside(
        cfg.out, resume=cfg.resume, save_every=cfg.save_every, stop_after_steps=cfg.stop_after_steps,
        max_minutes=cfg.max_minutes,
    )
    return device, settings, control


TEST_SPLIT = "test"  # the split of the fresh seed (test_seed) the held-out figures are scored on


def fresh_test_seed(cfg: Any) -> int | None:
    """``cfg.test_seed``, checked before the stage starts: a fresh seed for the held-out figures (its
    "test" split), or None (only the training seed's "val" split is reported).

    Raises:
        ConfigError: not an integer >= 0, or the training seed itself (not fresh).
    """
    seed = cfg.get("test_seed")
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"test_seed={seed}: must be an integer >= 0 or null")
    if seed == cfg.seed:
        raise ConfigError(f"test_seed={seed}: must differ from seed={cfg.seed} (a fresh seed's scenes, not the training seed's)")
    return seed


# Bump when what the held-out figures measure changes: figures remembered under another version are
# computed again.
FRESH_SEED_FIGURES_VERSION = 1


def fresh_seed_figures(
    out: Any, results: Optional[Mapping], test_seed: int, scenes: int, score: Callable[[], Any]
) -> Any:
    """The held-out figures on the "test" split of ``test_seed``: ``score()``, remembered in the stage's
    report so that rerunning a finished stage (every rerun of ``scripts/train_default_model.sh``) does
    not score the same weights again (20-45 s each).

    ``results`` is the finished stage's report as read by the finished-stage check (None right after a
    run, which just wrote it); figures remembered there for the same seed, split, scene count and
    :data:`FRESH_SEED_FIGURES_VERSION` are returned as they are (JSON: tuples read back as lists).
    ``out`` None: nothing is written.
    """
    scored_on = {"seed": test_seed, "split": TEST_SPLIT, "scenes": scenes, "version": FRESH_SEED_FIGURES_VERSION}
    remembered = (results or {}).get("fresh_seed")
    if isinstance(remembered, dict) and remembered.get("scored_on") == scored_on:
        return remembered["figures"]
    figures = score()
    if out is not None:
        add_to_report(out, "fresh_seed", {"scored_on": scored_on, "figures": figures})
    return figures


def end_stage(name: str, result: StageResult, steps: int, control: StageControl, out: Any) -> None:
    """Prints the stage's last line ("{name} pretrained: ..."); a stage stopped before its last step
    says how it can go on and exits with :data:`EXIT_STOPPED`."""
    if not result.finished:
        print(f"{name} pretraining stopped after {len(result.losses)} of {steps} steps ({result.seconds / 60:.1f} min this session); "
              + stopped_state(result.state_saved, control))
        sys.exit(EXIT_STOPPED)
    print(
        f"{name} pretrained: {steps} steps, final loss {result.losses[-1]:.4f}, "
        f"{result.seconds / 60:.1f} min this session; weights written to {out}"
    )
