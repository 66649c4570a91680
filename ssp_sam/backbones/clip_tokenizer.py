"""CLIP's BPE tokenizer with SSP-SAM's text convention (the period the release appends)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from open_clip.tokenizer import SimpleTokenizer
from torch import Tensor

from ..errors import ConfigError, ExpressionError


class ExpressionTruncatedWarning(UserWarning):
    """An expression had more BPE tokens than CLIP's context holds and was cut."""


class CLIPTokenizer:
    """CLIP's BPE tokenizer (open_clip's bundled vocabulary, offline) with SSP-SAM's text convention.

    The release feeds CLIP "{expr}." with the period appended unconditionally, so an expression
    already ending in "." gets a second one; ``append_period=True`` reproduces that exactly,
    ``append_period=False`` tokenizes the expression as given.
    """

    def __init__(self, context_length: int = 77, append_period: bool = True) -> None:
        if context_length < 2:
            raise ConfigError(f"context_length={context_length} leaves no room for the start and end tokens")
        self.context_length = context_length
        self.append_period = append_period
        self._bpe = SimpleTokenizer(context_length=context_length)

    def __call__(self, expressions: Sequence[str]) -> Tensor:
        """Token ids (B, context_length), int64: start token, BPE ids, end token, zero padding.

        Expressions that do not fit are cut to context_length with the end token kept last, as CLIP
        does, and an ExpressionTruncatedWarning names them.
        """
        if isinstance(expressions, str):
            raise ExpressionError("expressions must be a sequence of strings, got a single string")
        start, end = self._bpe.sot_token_id, self._bpe.eot_token_id
        tokens = torch.zeros(len(expressions), self.context_length, dtype=torch.long)
        for index, expression in enumerate(expressions):
            if not isinstance(expression, str) or not expression.strip():
                raise ExpressionError(f"expression {index} is not a non-empty string: {expression!r}")
            text = f"{expression}." if self.append_period else expression
            ids = [start, *self._bpe.encode(text), end]
            if len(ids) > self.context_length:
                warnings.warn(
                    f"expression {index} has {len(ids)} tokens, cut to {self.context_length}: {expression!r}",
                    ExpressionTruncatedWarning,
                    stacklevel=2,
                )
                ids = [*ids[: self.context_length - 1], end]
            tokens[index, : len(ids)] = torch.tensor(ids)
        return tokens
