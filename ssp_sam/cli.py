"""Shared plumbing of the command-line scripts: one-line errors and non-zero exits."""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, Optional, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from .errors import ConfigError, SSPSAMError, user_message

T = TypeVar("T")

EXIT_USAGE = 2


def fail(message: str, code: int = EXIT_USAGE) -> None:
    """Print ``error: message`` on stderr and exit with ``code``."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def reports_errors(main: Callable[..., T]) -> Callable[..., T]:
    """Turn our errors (bad files, arguments, keys) into a one-line message and exit code 2.

    A required config value left out (``???`` in the config, e.g. ``image=``) is named the same
    way. Apply it inside ``@hydra.main`` so Hydra never prints a traceback for a user's mistake.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except SSPSAMError as exc:
            fail(user_message(exc))
        except MissingMandatoryValue as exc:
            fail(f"{exc.full_key}: missing; give {exc.full_key}=...")
        except KeyboardInterrupt:
            fail("interrupted", code=130)

    return wrapper


def model_settings(cfg: DictConfig) -> Optional[dict[str, Any]]:
    """The command line's model settings of scripts/eval.py and predict.py (None: none given).

    ``model.<key>=v`` alone changes the loaded checkpoint's config (the shipped model's without
    ``checkpoint=``); ``model=<preset>`` names an architecture whose weights only a checkpoint holds, so
    it is refused without ``checkpoint=`` instead of being applied to the shipped model.
    """
    from hydra.core.hydra_config import HydraConfig

    preset = HydraConfig.get().runtime.choices.get("model")
    if cfg.checkpoint is None and preset is not None:
        raise ConfigError(f"checkpoint: give the checkpoint that goes with model={preset} (our directory or a released .pth)")
    return OmegaConf.to_container(cfg.model, resolve=True) if cfg.get("model") is not None else None
