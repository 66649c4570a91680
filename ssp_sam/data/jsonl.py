"""Users' own data in a simple JSON Lines format (one sample a line; the README's datasets section).

A line::

    {"image": "imgs/cat.jpg", "expression": "the cat on the left",
     "mask": "masks/cat.png"            # a binary PNG (non-zero = foreground), or
     "rle": {"size": [H, W], "counts": ...} | [rle, ...],   # COCO RLE, compressed or not, or
     "polygons": [[x1, y1, x2, y2, ...], ...],              # COCO-style flat polygons
     "boxes": [[x, y, w, h], ...]}      # optional

Relative paths are relative to the JSONL file's folder. Masks and boxes are in the image file's
stored pixel frame, as every dataset image is read (an EXIF orientation tag is not applied): the
``predictions.jsonl`` of :func:`ssp_sam.export.write_predictions` turns a photo's masks back into
that frame, so read back they lie on the pixels they were predicted on. At most one of mask / rle /
polygons may be given. A line with none of them and no boxes is a no-target sample (empty mask); a line with boxes
only is a box-only (REC) sample whose mask is unavailable. An optional "id" becomes the sample id
(default: the line number); every other unknown key is passed to ``meta``.

A dataset folder holds one ``<split>.jsonl`` per split.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import DatasetError
from .masks import CocoSegmentationMask, PngMask
from .records import ProblemLog, ReferringDataset, ReferringSample, TargetMask, select_splits, xywh_to_xyxy

LINE_KEYS = frozenset({"id", "image", "expression", "mask", "rle", "polygons", "boxes"})
TARGET_KEYS = ("mask", "rle", "polygons")


def _is_size(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value)


def _target(record: dict, folder: Path, label: str) -> tuple[TargetMask | None, tuple[int, int] | None]:
    """-> (mask source or None when no mask key is given, (H, W) if the record states it)."""
    given = [key for key in TARGET_KEYS if record.get(key) not in (None, [], "")]
    if len(given) > 1:
        raise DatasetError(f"{label}: give only one of {', '.join(TARGET_KEYS)} (got {', '.join(given)})")
    if not given:
        return None, None
    value = record[given[0]]
    if given[0] == "mask":
        if not isinstance(value, str):
            raise DatasetError(f"{label}: 'mask' must be a path to a PNG")
        return PngMask(folder / value), None
    if given[0] == "polygons":
        if not isinstance(value, list):
            raise DatasetError(f"{label}: 'polygons' must be a list of flat [x1, y1, ...] lists")
        return CocoSegmentationMask(((label, value),)), None
    rles = value if isinstance(value, list) else [value]
    if not all(isinstance(rle, dict) and "counts" in rle and _is_size(rle.get("size")) for rle in rles):
        raise DatasetError(f"{label}: 'rle' must be a COCO RLE {{size: [H, W], counts}} or a list of them")
    sizes = {tuple(rle["size"]) for rle in rles}
    if len(sizes) != 1:
        raise DatasetError(f"{label}: RLEs of different sizes {sorted(sizes)}")
    return CocoSegmentationMask(tuple((f"{label} rle {i}", rle) for i, rle in enumerate(rles))), sizes.pop()


def _sample_from_line(text: str, line_number: int, *, folder: Path, name: str, source: str) -> ReferringSample:
    label = f"{source} line {line_number}"
    try:
        record: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{label}: not valid JSON ({exc.msg})") from exc
    if not isinstance(record, dict):
        raise DatasetError(f"{label}: expected a JSON object")
    image, expression = record.get("image"), record.get("expression")
    if not isinstance(image, str) or not image:
        raise DatasetError(f"{label}: missing 'image' path")
    if not isinstance(expression, str) or not expression.strip():
        raise DatasetError(f"{label}: missing or empty 'expression'")
    boxes = record.get("boxes") or []
    if not isinstance(boxes, list):
        raise DatasetError(f"{label}: 'boxes' must be a list of [x, y, w, h]")
    boxes_xyxy = tuple(xywh_to_xyxy(box, f"{label} box") for box in boxes)
    target, size_hint = _target(record, folder, label)
    no_target = target is None and not boxes_xyxy
    extras = {key: value for key, value in record.items() if key not in LINE_KEYS}
    return ReferringSample(
        sample_id=str(record.get("id", line_number)),
        image_id=image,
        image_path=folder / image,
        expressions=(expression.strip(),),
        sentence_ids=(0,),
        ann_ids=(),
        boxes_xyxy=boxes_xyxy,
        no_target=no_target,
        target=CocoSegmentationMask(()) if no_target else target,
        size_hint=size_hint,
        meta={**extras, "dataset": name, "line": line_number},
    )


def read_jsonl_file(path: Path, *, name: str, split: str, task: str = "res") -> ReferringDataset:
    """Read one JSONL file -> dataset; all malformed lines are reported in one DatasetError."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    problems = ProblemLog(str(path))
    samples = []
    with open(path, encoding="utf-8") as file:
        for line_number, text in enumerate(file, start=1):
            if not text.strip():
                continue
            try:
                samples.append(_sample_from_line(text, line_number, folder=path.parent, name=name, source=path.name))
            except DatasetError as exc:
                problems.add(str(exc))
    problems.raise_if_any()
    return ReferringDataset(name, split, task, samples)


def read_jsonl(folder: Path, *, name: str, task: str = "res", splits: Sequence[str] | None = None) -> dict[str, ReferringDataset]:
    """Read ``<folder>/<split>.jsonl`` files -> {split: dataset}; None reads every split present."""
    folder = Path(folder)
    available = sorted(path.stem for path in folder.glob("*.jsonl")) if folder.is_dir() else []
    if not available:
        raise DatasetError(f"{folder}: no <split>.jsonl file found")
    return {
        split: read_jsonl_file(folder / f"{split}.jsonl", name=name, split=split, task=task)
        for split in select_splits(splits, available, str(folder))
    }
