"""The release's REC pretraining data: SimREC's ``merge.json``, read as distributed (boxes only).

The release pretrains on the file SimREC provides (legacy_data_prep_simrec.md): the training
referents of RefCOCO, RefCOCO+, RefCOCOg, ReferIt and Flickr30k Entities plus Visual Genome, with
the images of the RefCOCO family's val/test splits already removed. Layout::

    <folder>/merge.json     {"train": [entry, ...], "val": [entry, ...]}
    entry = {"iid": image id or file name, "data_source": "coco" | "flickr" | "vg" | "referit" ...,
             "bbox": [x, y, w, h], "refs": [sentence, ...], other keys (e.g. "mask_id") kept in meta}

Each entry is one referent with all its sentences and one box; there are no masks. Images:
``data_source`` "coco" names COCO train2014 by number (``iid`` "123.jpg" or 123 ->
``COCO_train2014_000000000123.jpg``, as SimREC and the release build it); every other source's
``iid`` is the file name inside that source's image folder (``image_roots[data_source]``).

Boxes are SimREC's [x, y, w, h] (its loader passes them to ``label2yolobox``, which reads w and h).
The release's loader passes merge boxes on unconverted, as if they were [x1, y1, x2, y2];
``box_format="xyxy"`` reads a file that really is x1, y1, x2, y2, and refuses one that is not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DatasetError
from .records import BoxXYXY, ProblemLog, ReferringDataset, ReferringSample, box_numbers, select_splits, xywh_to_xyxy
from .refer import load_json

ENTRY_KEYS = frozenset({"iid", "data_source", "bbox", "refs"})
BOX_FORMATS = ("xywh", "xyxy")
COCO_SOURCE = "coco"


def _xyxy_box(box: Any, label: str) -> BoxXYXY:
    """[x1, y1, x2, y2] -> tuple, refusing boxes whose corners are swapped (an xywh file read as xyxy)."""
    x1, y1, x2, y2 = box_numbers(box, label, "x1, y1, x2, y2")
    if x2 < x1 or y2 < y1:
        raise DatasetError(f"{label}: box {box!r} is not x1, y1, x2, y2 with x2 >= x1, y2 >= y1 (is the file xywh?)")
    return (x1, y1, x2, y2)


def _image_file(entry: dict, label: str) -> str:
    iid = entry.get("iid")
    if entry["data_source"] == COCO_SOURCE:
        try:
            return f"COCO_train2014_{int(str(iid).split('.')[0]):012d}.jpg"
        except ValueError as exc:
            raise DatasetError(f"{label}: coco iid must be an image number (e.g. 123 or '123.jpg'), got {iid!r}") from exc
    if not isinstance(iid, str) or not iid:
        raise DatasetError(f"{label}: iid must be the image's file name, got {iid!r}")
    return iid


def _sample(entry: Any, index: int, *, name: str, image_roots: Mapping[str, Path], box_format: str, label: str) -> ReferringSample:
    if not isinstance(entry, dict):
        raise DatasetError(f"{label}: not an object")
    source = entry.get("data_source")
    if source not in image_roots:
        known = ", ".join(sorted(image_roots)) or "none"
        raise DatasetError(f"{label}: data_source {source!r} has no image folder (image_roots has: {known})")
    refs = entry.get("refs")
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) and r.strip() for r in refs):
        raise DatasetError(f"{label}: refs must be a non-empty list of non-empty sentences")
    box = xywh_to_xyxy(entry.get("bbox"), label) if box_format == "xywh" else _xyxy_box(entry.get("bbox"), label)
    extras = {key: value for key, value in entry.items() if key not in ENTRY_KEYS}
    return ReferringSample(
        sample_id=str(index),
        image_id=entry.get("iid"),
        image_path=Path(image_roots[source]) / _image_file(entry, label),
        expressions=tuple(refs),  # as written: the release counts words on the raw text (sentence_samples.word_count)
        sentence_ids=tuple(range(len(refs))),
        ann_ids=(),
        boxes_xyxy=(box,),
        no_target=False,
        target=None,
        meta={**extras, "dataset": name, "data_source": source},
    )


def read_rec_json(
    path: Path,
    *,
    image_roots: Mapping[str, Path],
    name: str,
    box_format: str = "xywh",
    task: str = "res",
    splits: Sequence[str] | None = None,
) -> dict[str, ReferringDataset]:
    """Read a SimREC-style REC annotation file -> {split: dataset of box-only samples}.

    Args:
        path: the JSON file (``merge.json``).
        image_roots: data_source -> folder of its images.
        box_format: "xywh" (SimREC's files) or "xyxy".
        splits: splits to build; None builds every split in the file.

    Raises:
        ConfigError: an unknown box_format.
        DatasetError: missing file, unknown split, or malformed entries (all listed in one message).
    """
    if box_format not in BOX_FORMATS:
        raise ConfigError(f"dataset {name}: box_format must be one of {', '.join(BOX_FORMATS)}, got {box_format!r}")
    path = Path(path)
    data = load_json(path)
    if not isinstance(data, dict) or not all(isinstance(entries, list) for entries in data.values()):
        raise DatasetError(f"{path}: expected a JSON object {{split: [entry, ...]}}")
    problems = ProblemLog(str(path))
    datasets = {}
    for split in select_splits(splits, list(data), str(path)):
        samples = []
        for index, entry in enumerate(data[split]):
            try:
                samples.append(_sample(entry, index, name=name, image_roots=image_roots, box_format=box_format,
                                       label=f"{split} entry {index}"))
            except DatasetError as exc:
                problems.add(str(exc))
        datasets[split] = ReferringDataset(name, split, task, samples)
    problems.raise_if_any()
    return datasets
