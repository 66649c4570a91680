"""Shared plumbing of the command-line scripts: one-line errors and non-zero exits."""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

from omegaconf.errors import MissingMandatoryValue

from .errors import SSPSAMError, user_message

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
