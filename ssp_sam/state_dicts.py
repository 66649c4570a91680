"""Comparing a checkpoint's state dict with a model's, for error messages that name every problem."""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional

import torch
from torch import Tensor

SHOWN = 5


def _listed(items: list[str], limit: int) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _shape(tensor: Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def mismatch_report(
    given: Mapping[str, Tensor],
    expected: Mapping[str, Tensor],
    required: Optional[Callable[[str], bool]] = None,
    first: Iterable[str] = (),
    limit: int = SHOWN,
) -> Optional[str]:
    """Describe how ``given`` (a checkpoint) fails to fit ``expected`` (a model), or None if it fits.

    Args:
        given: the checkpoint's tensors by key.
        expected: the model's state dict.
        required: which expected keys the checkpoint must hold (default: all).
        first: key prefixes listed before the others (the parts that tell models apart best).
        limit: keys shown per kind of problem.
    Returns:
        e.g. "mis-shaped keys: a.weight (file (4, 2), model (8, 2)); missing keys: b.bias (8,);
        unexpected keys: c.weight".
    """
    first = tuple(first)

    def order(keys: Iterable[str]) -> list[str]:
        return sorted(keys, key=lambda key: (not key.startswith(first) if first else False, key))

    mis_shaped = order(k for k in given if k in expected and _shape(given[k]) != _shape(expected[k]))
    missing = order(k for k in expected if k not in given and (required is None or required(k)))
    unexpected = order(k for k in given if k not in expected)
    problems = []
    if mis_shaped:
        items = [f"{k} (file {_shape(given[k])}, model {_shape(expected[k])})" for k in mis_shaped]
        problems.append(f"mis-shaped keys: {_listed(items, limit)}")
    if missing:
        problems.append(f"missing keys: {_listed([f'{k} {_shape(expected[k])}' for k in missing], limit)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listed(unexpected, limit)}")
    return "; ".join(problems) or None


def differs_under(stored: Mapping[str, Tensor], current: Mapping[str, Tensor], prefix: str | tuple[str, ...]) -> bool:
    """Whether ``stored`` holds a value under ``prefix`` that ``current`` lacks or holds differently."""
    return any(k.startswith(prefix) and (k not in current or not torch.equal(v, current[k])) for k, v in stored.items())
