"""Which objects a predicted mask picks out: the error analysis behind the README's ShapeWorld limits.

IoU alone cannot tell a mask of the wrong object from a mask of the right object together with its
look-alikes. Since a ShapeWorld scene knows every object's exact mask, each prediction is reduced
to the set of objects it *covers* (more than half of the object's pixels inside the mask, or more
than half of the mask's pixels on the object) and compared with the expression's targets.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# In the order the analysis table prints them.
OUTCOMES = ("exact", "with others", "partial", "wrong", "nothing")
OUTCOME_MEANINGS = {
    "exact": "covers the targets and nothing else (for a no-target expression: covers no object)",
    "with others": "covers every target and at least one other object",
    "partial": "covers some of the targets, not all",
    "wrong": "covers only objects that are not targets",
    "nothing": "covers no object although there are targets",
}


# The wrong answers to a location (L) sentence, by which object was taken instead of the target.
LOCATION_ERRORS = ("opposite end", "other fitting", "not fitting")
LOCATION_ERROR_MEANINGS = {
    "opposite end": "covers only the fitting object at the other extreme (the side word misread)",
    "other fitting": "covers only fitting objects, not the target nor only the opposite one",
    "not fitting": "covers an object the description does not fit (the description misread)",
}


def location_error(covered: Sequence[int], candidates: Sequence[int]) -> str | None:
    """Which of :data:`LOCATION_ERRORS` a "wrong" answer to an L sentence is; None when the target
    (``candidates[0]``, see ``expressions.read_location``) is covered or nothing is."""
    covered = set(covered)
    if not covered or candidates[0] in covered:
        return None
    if not covered <= set(candidates):
        return "not fitting"
    return "opposite end" if covered == {candidates[-1]} else "other fitting"


def covered_objects(mask: np.ndarray, object_masks: Sequence[np.ndarray], min_coverage: float = 0.5) -> tuple[int, ...]:
    """Indices of the objects the mask picks out: more than ``min_coverage`` of the object's pixels lie
    inside ``mask``, or more than ``min_coverage`` of the mask's pixels lie on the object.

    The second rule counts a mask drawn mostly on a large object it covers less than half of (e.g. the
    wrong, larger square for "the leftmost small square"), which the first alone would call "nothing",
    or leave out beside a covered target.

    Args:
        mask: (H, W) bool prediction (empty for a no-target answer).
        object_masks: (H, W) bool masks of the scene's objects (non-empty).
    """
    area = mask.sum()
    covered = []
    for index, object_mask in enumerate(object_masks):
        inside = np.logical_and(mask, object_mask).sum()
        if inside > min_coverage * object_mask.sum() or (area and inside > min_coverage * area):
            covered.append(index)
    return tuple(covered)


def grounding_outcome(covered: Sequence[int], targets: Sequence[int]) -> str:
    """One of :data:`OUTCOMES` for a prediction that covers ``covered`` when ``targets`` were meant."""
    covered, targets = set(covered), set(targets)
    if covered == targets:
        return "exact"
    if not targets:
        return "wrong"  # objects segmented for a no-target expression
    if targets <= covered:
        return "with others"
    if covered & targets:
        return "partial"
    return "wrong" if covered else "nothing"
