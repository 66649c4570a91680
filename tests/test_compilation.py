"""torch.compile as an option: where no compiler works, one warning and the eager result."""

from __future__ import annotations

import re
import warnings

import pytest

import torch
import torch._inductor.config as inductor_config

from ssp_sam.engine.compilation import compiled_or_eager

from conftest import tiny_model


def test_without_a_working_compiler_the_eager_function_runs_after_one_warning(monkeypatch):
    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setattr(inductor_config, "force_disable_caches", True)  # no compiled artefact from an earlier run
    torch._dynamo.reset()
    model = tiny_model()
    head = model.prompt_generator.box_head
    calls = []

    def boxes(x):
        calls.append(1)
        return head(x).sigmoid()

    run = compiled_or_eager(boxes, "compile: the box head")
    x = torch.randn(3, model.mask_head.embed_dim)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = run(x), run(x + 1)
    ours = [str(w.message) for w in caught if str(w.message).startswith("compile: the box head")]
    assert len(ours) == 1 and "running eagerly" in ours[0] and "compiler" in ours[0]
    with torch.no_grad():
        assert torch.equal(first, head(x).sigmoid()) and torch.equal(second, head(x + 1).sigmoid())
    assert len(calls) >= 2  # the eager function ran for both calls (Dynamo may also have traced it once)
    torch._dynamo.reset()


def test_errors_of_the_function_itself_are_raised_not_taken_for_a_missing_compiler():
    run = compiled_or_eager(lambda x: x.reshape(7), "compile: reshape")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match=re.escape("shape '[7]' is invalid")):
            run(torch.zeros(3))
    assert not [w for w in caught if "running eagerly" in str(w.message)]
    torch._dynamo.reset()
