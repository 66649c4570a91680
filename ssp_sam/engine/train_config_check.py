"""Checking a training run's options before any work (reading data, caching, building the model).

A mistyped number (``train.lr=abc``) or an impossible one (``train.batch_size=0``,
``train.workers=-1``) otherwise fails deep inside PyTorch after the data has been read and the
embedding cache filled; here it stops at once with one line naming the key.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from ..errors import ConfigError
from ..outputs import check_output_dir

# key under train: -> (int or float, smallest allowed value, whether null/false means "off")
RULES: dict[str, tuple[type, float, bool]] = {
    "epochs": (int, 1, False),
    "batch_size": (int, 1, False),
    "workers": (int, 0, False),
    "warmup_epochs": (int, 0, False),
    "decoder_freeze_epochs": (int, 0, False),
    "log_every": (int, 1, False),
    "max_steps_per_epoch": (int, 1, True),
    "lr": (float, 0, False),
    "decoder_lr": (float, 0, False),
    "min_lr": (float, 0, False),
    "weight_decay": (float, 0, False),
    "grad_clip": (float, 0, True),
}


def _as_number(value: Any, kind: type) -> float | None:
    """``value`` as a finite number of ``kind``, or None (bools, text and 2.5 are not integers)."""
    if isinstance(value, bool):
        return None
    if kind is int and isinstance(value, str):
        value = value.strip()
        return float(value) if value.lstrip("+-").isdigit() else None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number) or (kind is int and number != int(number)):
        return None
    return number


def check_train_options(train: Mapping[str, Any]) -> None:
    """Raise ConfigError naming the first key of the ``train:`` section that is not usable."""
    for key, (kind, minimum, may_be_off) in RULES.items():
        if key not in train:
            continue
        value = train[key]
        if may_be_off and (value is None or value is False):
            continue
        number = _as_number(value, kind)
        if number is None or number < minimum:
            wanted = f"{'an integer' if kind is int else 'a number'} >= {minimum}" + (" (or null)" if may_be_off else "")
            raise ConfigError(f"train.{key}={value}: must be {wanted}")


def check_train_config(cfg: Mapping[str, Any]) -> None:
    """The whole training config, before any work: the ``train:`` options and a writable ``run_dir``."""
    check_train_options(cfg["train"])
    check_output_dir(cfg["run_dir"], "run_dir")
