"""Errors of ours: every bad input is reported with the file, argument or key it concerns.

Scripts catch :class:`SSPSAMError`, print its message on one line and exit non-zero, so a user
never sees a deep traceback for a problem with their own input.
"""

import re

# How torch re-raises an error of a DataLoader worker in the main process: the same type, with the
# worker's whole traceback as the message (torch/_utils.py, ExceptionWrapper.reraise).
_WORKER_ERROR = re.compile(r"Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")


class SSPSAMError(Exception):
    """Base class of every user-facing error raised by ``ssp_sam``."""


class ImageError(SSPSAMError):
    """An image file or array that cannot be read or converted to RGB."""


class ExpressionError(SSPSAMError):
    """An expression that cannot be used (empty, whitespace only, not a string)."""


class CheckpointError(SSPSAMError):
    """A checkpoint that is missing, unreadable, or of another model (keys or shapes differ)."""


class ConfigError(SSPSAMError):
    """An impossible or unknown configuration value."""


class DatasetError(SSPSAMError):
    """A dataset layout with missing or malformed files, or an unknown split."""


class CacheError(SSPSAMError):
    """An embedding cache that cannot be used (wrong encoder, unreadable index)."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), for one-line errors."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def user_message(error: BaseException) -> str:
    """The message a user is shown for one of our errors, also when a data-loader worker raised it.

    torch re-raises a worker's error as "Caught DatasetError in DataLoader worker process 0." followed
    by the worker's traceback; its last line, ``ssp_sam.errors.DatasetError: <message>``, holds the
    message naming the file, which is what is returned then.
    """
    text = str(error)
    if not _WORKER_ERROR.match(text):
        return text
    last = text.rstrip().splitlines()[-1]
    kind, separator, message = last.partition(": ")
    return message if separator and kind.endswith(type(error).__name__) else last
