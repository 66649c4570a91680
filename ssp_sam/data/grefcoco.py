"""gRefCOCO (generalized RES: zero, one or many targets), read from the files as distributed.

Layout (formats.md)::

    <folder>/grefs(unc).json      JSON list of refs, like RefCOCO's but ann_id and category_id are
                                  lists and no_target is true/false; a no-target ref has ann_id [-1]
    <folder>/instances.json       COCO style, as RefCOCO's
    <image_root>/<images[image_id].file_name>

A ref's target is the list of its annotation ids without the -1 placeholder; an empty list is a
no-target sample (empty mask, no boxes). Crowd annotations (``iscrowd`` true) are not part of the
target: G_REFER's ``getMaskByRef``, ReLA's loader and mapper and the release's preprocessing all
skip them, so the GT mask is the union of the ref's non-crowd annotations' masks. A ref whose
annotations are all crowd is reported as malformed: it is not a no-target ref (its ``no_target`` is
false), and G_REFER (the sum of an empty mask list) and ReLA (``assert empty``) both fail on it, so
gRefCOCO has none. With ``crowd_in_boxes`` (the default, the release's box target, taken from
``getRefBox`` over every annotation of the ref) the crowd annotations' boxes are kept in
``boxes_xyxy``; without it the boxes are those of the target instances only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .records import ProblemLog, ReferringDataset
from .refer import REF_KEYS, build_splits, load_instances, load_json, refs_file

GREF_KEYS = REF_KEYS | {"no_target"}
NO_TARGET_ID = -1


def _as_id_list(value, key: str, problems: ProblemLog, label: str) -> list[int] | None:
    ids = [value] if isinstance(value, int) else value
    if not isinstance(ids, list) or not all(isinstance(item, int) for item in ids):
        problems.add(f"{label}: {key} must be a list of integers, got {value!r}")
        return None
    return ids


def _multi_target(ref: dict, problems: ProblemLog, label: str):
    ann_ids = _as_id_list(ref.get("ann_id"), "ann_id", problems, label)
    category_ids = _as_id_list(ref.get("category_id"), "category_id", problems, label)
    if ann_ids is None or category_ids is None:
        return None
    targets = tuple(ann_id for ann_id in ann_ids if ann_id != NO_TARGET_ID)
    declared = ref.get("no_target")
    if declared is not None and bool(declared) == bool(targets):
        problems.add(f"{label}: no_target is {declared} but ann_id is {ann_ids}")
        return None
    return targets, tuple(category_id for category_id in category_ids if category_id != NO_TARGET_ID)


def read_grefcoco(
    folder: Path,
    *,
    split_by: str = "unc",
    image_root: Path,
    name: str,
    task: str = "gres",
    splits: Sequence[str] | None = None,
    crowd_in_boxes: bool = True,
) -> dict[str, ReferringDataset]:
    """Read ``grefs(<split_by>).json`` + ``instances.json`` of ``folder`` -> {split: dataset}.

    Args:
        image_root: folder the images' file_name is relative to.
        splits: splits to build; None builds every split in the file.
        crowd_in_boxes: keep crowd annotations' boxes in ``boxes_xyxy`` (see the module docstring).
    """
    folder, image_root = Path(folder), Path(image_root)
    refs_path = refs_file(folder, "grefs", split_by, ".json")
    instances = load_instances(folder / "instances.json")
    return build_splits(
        load_json(refs_path),
        instances,
        source=refs_path,
        name=name,
        task=task,
        image_root=image_root,
        ref_keys=GREF_KEYS,
        read_targets=_multi_target,
        splits=splits,
        skip_crowd=True,
        crowd_in_boxes=crowd_in_boxes,
    )
