"""Checking where results will go before any work is done.

A script that evaluates for an hour and then cannot write its results has wasted the hour: every
script checks its output paths first, with these functions, and stops with one line naming the
option when a path cannot be written (it is a directory where a file is wanted or the reverse,
it lies under a file, or the nearest existing folder is not writable).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError


def _nearest_existing(path: Path) -> Path:
    """``path`` itself or the closest of its parents that exists (as anything)."""
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(".")


def _check_creatable_under(path: Path, key: str) -> None:
    """The folders ``path`` needs can be created, or exist, and are writable."""
    existing = _nearest_existing(path.parent)
    if not existing.is_dir():
        raise ConfigError(f"{key}={path}: {existing} is a file, so nothing can be written under it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={path}: the folder {existing} is not writable")


def check_output_file(path: str | os.PathLike | None, key: str) -> None:
    """Raise ConfigError unless a file can be written at ``path`` (None: no output asked for).

    Args:
        key: the option that names the path, for the message ("metrics_out", "--out-md").
    """
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{key}={path}: is a directory; give a file name")
    _check_creatable_under(path, key)


def check_output_dir(path: str | os.PathLike | None, key: str, required: bool = False) -> None:
    """Raise ConfigError unless ``path`` is, or can be made, a writable directory (None: no output).

    Args:
        required: the caller always writes there, so None and an empty path (which would mean the
            current directory) are refused too.
    """
    if required and (path is None or not str(path).strip()):
        raise ConfigError(f"{key}: give the folder to write into (got {'null' if path is None else 'an empty path'})")
    if path is None:
        return
    path = Path(path)
    if os.path.lexists(path):
        if not path.is_dir():
            raise ConfigError(f"{key}={path}: is a file; give a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{key}={path}: the folder is not writable")
        return
    _check_creatable_under(path, key)
