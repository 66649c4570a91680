"""Typed configuration of scripts/eval.py (``configs/eval.yaml``), validated once before any work.

As :mod:`ssp_sam.engine.train_config` does for training: the composed options (all but the ``model``
and ``dataset`` sections, which the checkpoint loader and the dataset registry check) merge into
:class:`EvalRunConfig` through OmegaConf's structured configs, so an unknown key (``+protocl=rela``) or a
value of the wrong type, out of range or not one of its choices fails with one line naming the key,
whether or not this run would use the option (``cache_dtype`` without a cache, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..errors import ConfigError, first_line
from .config_fields import check_fields, choice, merge_config, number
from .evaluator import GROUP_KEY_AUTO
from .precision import PRECISIONS
from .protocols import check_protocol

CACHE_DTYPES = ("auto", "fp32", "fp16", "bf16")  # ssp_sam.data.embedding_cache.STORAGE_DTYPES and auto


@dataclass
class EvalRunConfig:
    """scripts/eval.py's options (configs/eval.yaml says what each does); ``model`` and ``dataset`` are not
    part of it (the checkpoint loader and the dataset registry check them)."""

    checkpoint: Optional[str] = None
    metrics_out: Optional[str] = None
    samples_out: Optional[str] = None
    label: Optional[str] = None
    cache_dir: Optional[str] = None
    cache_batch_size: int = number(4, 1)
    cache_dtype: str = choice("auto", CACHE_DTYPES)
    device: str = "auto"
    max_batch: int = number(32, 1)
    images_per_batch: int = number(4, 1)
    workers: int = number(2, 0)
    precision: str = choice("auto", PRECISIONS)
    compile: bool = False
    group_key: Optional[str] = GROUP_KEY_AUTO
    protocol: str = "standard"  # checked by check_protocol (its message lists the protocols)
    progress: bool = True


def eval_run_config_from(cfg: Mapping | DictConfig) -> EvalRunConfig:
    """Validate a composed evaluation config (configs/eval.yaml) into an :class:`EvalRunConfig`.

    Every option is checked whether or not it is used by this run (``cache_dtype`` without a cache, ...),
    so that a mistyped one never passes unnoticed.

    Raises:
        ConfigError: one line naming the first unusable key (unknown, e.g. ``+protocl=rela``; wrong type;
            out of range; not one of its choices).
    """
    try:
        raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{exc.full_key or 'config'}: cannot be resolved ({first_line(exc)})") from None
    sections = {key: value for key, value in raw.items() if key not in ("model", "dataset")}
    config = merge_config(EvalRunConfig, sections, raw, "an evaluation option (configs/eval.yaml lists them)")
    check_fields("", config, raw)
    check_protocol(config.protocol)
    return config
