"""The grounding analysis: which objects a mask covers, the outcome it counts, and its script."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from ssp_sam.data.shapeworld import generate_refs, generate_scene
from ssp_sam.data.shapeworld.grounding import OUTCOMES, covered_objects, grounding_outcome

from conftest import run_script


def _box_mask(x0: int, x1: int) -> np.ndarray:
    mask = np.zeros((4, 10), dtype=bool)
    mask[:, x0:x1] = True
    return mask


def test_an_object_is_covered_when_more_than_half_of_it_is_in_the_mask():
    objects = [_box_mask(0, 4), _box_mask(6, 10)]  # 16 px each
    assert covered_objects(_box_mask(0, 3), objects) == (0,)  # 12 of 16 px
    assert covered_objects(_box_mask(0, 2), objects) == ()  # exactly half is not more than half
    assert covered_objects(_box_mask(1, 9), objects) == (0, 1)  # 12 and 12 of 16
    assert covered_objects(_box_mask(0, 2), objects, min_coverage=0.25) == (0,)


@pytest.mark.parametrize(
    ("covered", "targets", "outcome"),
    [
        ((2,), (2,), "exact"),
        ((), (), "exact"),  # a no-target expression answered with no object
        ((0, 2), (2,), "with others"),  # the L failure: the target and its look-alike
        ((1, 3), (1, 3), "exact"),
        ((1,), (1, 3), "partial"),
        ((1, 4), (1, 3), "partial"),
        ((0,), (2,), "wrong"),
        ((0,), (), "wrong"),  # something segmented for a no-target expression
        ((), (2,), "nothing"),
    ],
)
def test_grounding_outcome(covered, targets, outcome):
    assert outcome in OUTCOMES
    assert grounding_outcome(covered, targets) == outcome


def test_script_counts_every_expression_of_the_regenerated_scenes(tmp_path):
    out = tmp_path / "counts.json"
    result = run_script("analyze_shapeworld.py", "task=gres", "seed=5", "n_images=2", f"out={out}", "device=cpu")
    assert result.returncode == 0, result.stderr
    counts = json.loads(out.read_text())["counts"]
    expected = Counter(
        sentence.kind for index in range(2) for ref in generate_refs(generate_scene(5, "test", index), "gres")
        for sentence in ref.sentences
    )
    assert {kind: sum(row.values()) for kind, row in counts.items() if kind != "all"} == dict(expected)
    assert sum(counts["all"].values()) == sum(expected.values())
    assert "with others" in result.stdout


def test_script_bad_arguments_exit_2_naming_the_key(tmp_path):
    result = run_script("analyze_shapeworld.py", "min_coverage=1.5", "n_images=1")
    assert result.returncode == 2 and "min_coverage" in result.stderr
    result = run_script("analyze_shapeworld.py", "split=nope", "n_images=1")
    assert result.returncode == 2 and "split" in result.stderr
