"""``torch.compile`` as an option that never stops a run: where it cannot compile, it runs eagerly.

Compiling needs a working backend (inductor: a C++ compiler on the CPU, Triton on CUDA) and a
Python that Dynamo supports; neither can be checked reliably before the first call, which is when
Dynamo traces and the backend compiles. :func:`compiled_or_eager` therefore tries the compiled
function on its first call and, if compiling fails, says so in one warning and keeps the eager
function for good. Only a backend failure counts as "cannot compile": errors of the function
itself reach the caller as they are.
"""

from __future__ import annotations

import warnings
from typing import Callable, TypeVar

import torch
from torch._dynamo.exc import BackendCompilerFailed

from ..errors import first_line

Function = TypeVar("Function", bound=Callable)


def compiled_or_eager(function: Function, what: str) -> Function:
    """``torch.compile(function, dynamic=True)``, or ``function`` itself where that cannot compile.

    Args:
        function: what to compile (e.g. ``model.decode``).
        what: its name in the warning (e.g. "eval.compile: the decoder").
    """
    try:
        compiled = torch.compile(function, dynamic=True)
    except RuntimeError as error:  # e.g. a Python version Dynamo does not support
        _warn(what, error)
        return function
    chosen: list[Callable] = []

    def run(*args, **kwargs):
        if chosen:
            return chosen[0](*args, **kwargs)
        try:
            result = compiled(*args, **kwargs)
        except BackendCompilerFailed as error:  # no C++ compiler, no Triton, ...
            _warn(what, error)
            chosen.append(function)
            return function(*args, **kwargs)
        chosen.append(compiled)
        return result

    return run  # type: ignore[return-value]


def _warn(what: str, error: BaseException) -> None:
    reason = first_line(error)
    warnings.warn(f"{what}: torch.compile is not available here ({reason[:200]}); running eagerly", stacklevel=3)
