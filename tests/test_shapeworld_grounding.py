"""The grounding analysis: which objects a mask covers, the outcome it counts, and its script."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from ssp_sam.data.shapeworld import SceneObject, generate_refs, generate_scene
from ssp_sam.data.shapeworld.expressions import Expression, enumerate_expressions, read_location, subkind
from ssp_sam.data.shapeworld.grounding import LOCATION_ERRORS, OUTCOMES, covered_objects, grounding_outcome, location_error

from conftest import run_script


def _box_mask(x0: int, x1: int) -> np.ndarray:
    mask = np.zeros((4, 10), dtype=bool)
    mask[:, x0:x1] = True
    return mask


def test_an_object_is_covered_when_more_than_half_of_it_is_in_the_mask_or_of_the_mask_on_it():
    objects = [_box_mask(0, 4), _box_mask(6, 10)]  # 16 px each
    assert covered_objects(_box_mask(0, 3), objects) == (0,)  # 12 of 16 px
    assert covered_objects(_box_mask(0, 2) | _box_mask(4, 6), objects) == ()  # half the object, half the mask: not more
    assert covered_objects(_box_mask(1, 9), objects) == (0, 1)  # 12 and 12 of 16
    assert covered_objects(_box_mask(0, 2), objects, min_coverage=0.25) == (0,)
    # A mask lying mostly on an object it covers less than half of still picks that object out.
    large, small = _box_mask(0, 10), _box_mask(0, 1)  # 40 px and 4 px
    assert covered_objects(_box_mask(2, 5), [large, small]) == (0,)  # 12 of 40 px, but all 12 mask pixels
    assert covered_objects(_box_mask(0, 3), [large, small]) == (0, 1)  # the small one whole, 12 of 12 px on the large
    assert covered_objects(np.zeros((4, 10), dtype=bool), [large, small]) == ()


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


def _object(shape: str, color: str, size: str, cx: float, cy: float) -> SceneObject:
    return SceneObject(shape, color, size, 15.0, (cx, cy), 0.0, np.zeros((1, 1), dtype=bool))


# Three red circles and a blue one, laid out by hand: x grows to the right, y downwards.
HAND_SCENE = (
    _object("circle", "red", "small", 40, 200),
    _object("circle", "red", "large", 130, 60),
    _object("circle", "blue", "large", 20, 20),
    _object("circle", "red", "small", 220, 120),
)


@pytest.mark.parametrize(
    ("text", "side", "candidates"),
    [
        ("the leftmost red circle", "left", (0, 1, 3)),
        ("the red circle on the right", "right", (3, 1, 0)),
        ("the small red circle on the top", "top", (3, 0)),
        ("the bottommost circle", "bottom", (0, 3, 1, 2)),
        ("the large shape on the left", "left", (2, 1)),
        ("the topmost large circle", "top", (2, 1)),
    ],
)
def test_a_location_sentence_reads_back_into_its_side_and_fitting_objects(text, side, candidates):
    reading = read_location(text, HAND_SCENE)
    assert (reading.side, reading.candidates) == (side, candidates)


def test_every_generated_location_sentence_reads_back_to_its_target():
    """The generator's own targets are the reference: the asked extreme of the fitting objects."""
    checked = 0
    for index in range(30):
        objects = generate_scene(11, "train", index).objects
        for expression in enumerate_expressions(objects, "gres"):
            if expression.kind == "L":
                reading = read_location(expression.text, objects)
                assert reading.candidates[0] == expression.targets[0] and len(reading.candidates) >= 2, expression.text
                checked += 1
    assert checked > 100
    with pytest.raises(ValueError, match="not a location sentence"):
        read_location("the red circle left of the blue square", HAND_SCENE)


@pytest.mark.parametrize(
    ("text", "target", "expected"),
    [
        ("the leftmost red circle", 0, "L-described"),  # the blue circle (x 20) is further left than the target (x 40)
        ("the red circle on the right", 3, "L-shortcut"),  # the target is the rightmost object of all
        ("the small red circle on the top", 3, "L-described"),  # the blue circle (y 20) is higher
        ("the bottommost circle", 0, "L-shortcut"),
    ],
)
def test_subkind_tells_whether_the_side_word_alone_finds_the_target(text, target, expected):
    assert subkind(Expression(text, "L", "", (target,)), HAND_SCENE) == expected
    assert subkind(Expression("the blue circle", "A", "the {color} {shape}", (2,)), HAND_SCENE) == "A"


@pytest.mark.parametrize(
    ("covered", "error"),
    [
        ((0,), None),  # the target: no error
        ((0, 1), None),  # the target and a look-alike: counted as "with others", not a wrong answer
        ((), None),  # nothing covered: counted as "nothing"
        ((3,), "opposite end"),
        ((1,), "other fitting"),
        ((1, 3), "other fitting"),
        ((2,), "not fitting"),
        ((3, 2), "not fitting"),
    ],
)
def test_location_error_names_the_object_taken_instead(covered, error):
    candidates = (0, 1, 3)  # "the leftmost red circle" in HAND_SCENE
    assert error is None or error in LOCATION_ERRORS
    assert location_error(covered, candidates) == error


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
    location = json.loads(out.read_text())["location"]
    for breakdown in ("by_side", "by_fitting_objects"):
        assert sum(sum(row.values()) for row in location[breakdown].values()) == expected["L"]
    wrong_l = counts["L"]["wrong"]
    assert sum(location["wrong_answers"].values()) == wrong_l
    assert "wrong answers, of all L sentences" in result.stdout


def test_script_bad_arguments_exit_2_naming_the_key(tmp_path):
    result = run_script("analyze_shapeworld.py", "min_coverage=1.5", "n_images=1")
    assert result.returncode == 2 and "min_coverage" in result.stderr
    result = run_script("analyze_shapeworld.py", "split=nope", "n_images=1")
    assert result.returncode == 2 and "split" in result.stderr
