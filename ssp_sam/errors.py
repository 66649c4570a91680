"""Errors of ours: every bad input is reported with the file, argument or key it concerns.

Scripts catch :class:`SSPSAMError`, print its message on one line and exit non-zero, so a user
never sees a deep traceback for a problem with their own input.
"""


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
