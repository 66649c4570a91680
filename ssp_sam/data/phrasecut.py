"""VGPhraseCut, read from the files as distributed (SSP-SAM evaluates it zero-shot on "test").

Layout::

    <folder>/refer_<split>.json          list of tasks {task_id, image_id, phrase, phrase_structure,
                                         ann_ids, instance_boxes: [[x, y, w, h], ...],
                                         Polygons: [[polygon, ...] per instance], polygon = [[x, y], ...]}
    <folder>/image_data_split.json       optional: [{image_id, width, height, split, ...}]
    <image_root>/<image_id>.jpg          Visual Genome images

The task JSON has no image size. It is taken from the image-data file when one is present
(``image_data_split.json``, the older ``image_data_split3000.json``, or ``image_data.json``), and
otherwise read from each image's header the first time it is needed (cached per path).

The GT mask is drawn the way the PhraseCut API draws it, so scores match its evaluation: every
polygon's points truncated to integers and filled together with its outline (PIL ImageDraw). This
is about half a pixel larger on each border than pycocotools' rasterisation of the same polygon.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..errors import DatasetError
from .records import ProblemLog, ReferringDataset, ReferringSample, select_splits, xywh_to_xyxy
from .refer import load_json

TASK_KEYS = frozenset({"task_id", "image_id", "phrase", "instance_boxes", "Polygons", "ann_ids"})
IMAGE_DATA_FILES = ("image_data_split.json", "image_data_split3000.json", "image_data.json")


@dataclass(frozen=True)
class PhraseCutPolygons:
    """A task's instances, each a list of polygons of [x, y] points; decoded as their union.

    Attributes:
        instances: the task's "Polygons" entry.
        label: names the task (file and task id) in error messages.
    """

    instances: tuple[Any, ...]
    label: str

    def decode(self, height: int, width: int) -> np.ndarray:
        """Fill every polygon (integer-truncated points, outline included) -> bool (height, width)."""
        canvas = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(canvas)
        for polygons in self.instances:
            for polygon in polygons:
                try:
                    points = [(int(x), int(y)) for x, y in polygon]
                except (TypeError, ValueError) as exc:
                    raise DatasetError(f"{self.label}: a polygon must be a list of [x, y] points") from exc
                if len(points) >= 2:
                    draw.polygon(points, fill=1, outline=1)
        return np.asarray(canvas, dtype=bool)


def _image_sizes(folder: Path) -> dict[Any, tuple[int, int]]:
    """image_id -> (H, W) from the first image-data file present; {} if there is none."""
    for file_name in IMAGE_DATA_FILES:
        path = folder / file_name
        if path.is_file():
            entries = load_json(path)
            if not isinstance(entries, list):
                raise DatasetError(f"{path}: expected a list of images")
            return {
                entry["image_id"]: (entry["height"], entry["width"])
                for entry in entries
                if isinstance(entry, dict) and {"image_id", "height", "width"} <= entry.keys()
            }
    return {}


def _sample_from_task(task: Any, index: int, *, name: str, image_root: Path, sizes: dict, source: str, problems: ProblemLog):
    if not isinstance(task, dict):
        problems.add(f"entry {index}: not a task object")
        return None
    label = f"task {task.get('task_id', index)}"
    phrase, polygons, boxes = task.get("phrase"), task.get("Polygons"), task.get("instance_boxes")
    if not isinstance(phrase, str) or not phrase.strip():
        problems.add(f"{label}: empty phrase")
        return None
    if not isinstance(polygons, list) or not polygons or not isinstance(boxes, list) or len(boxes) != len(polygons):
        problems.add(f"{label}: needs non-empty Polygons and instance_boxes of the same length")
        return None
    try:
        boxes_xyxy = tuple(xywh_to_xyxy(box, f"{label} instance box") for box in boxes)
    except DatasetError as exc:
        problems.add(str(exc))
        return None
    image_id = task.get("image_id")
    extras = {key: value for key, value in task.items() if key not in TASK_KEYS}
    return ReferringSample(
        sample_id=str(task.get("task_id", index)),
        image_id=image_id,
        image_path=image_root / f"{image_id}.jpg",
        expressions=(phrase.strip(),),
        sentence_ids=(0,),
        ann_ids=tuple(task.get("ann_ids", ())),
        boxes_xyxy=boxes_xyxy,
        no_target=False,
        target=PhraseCutPolygons(tuple(polygons), f"{source} {label}"),
        size_hint=sizes.get(image_id),
        meta={**extras, "dataset": name, "task_id": task.get("task_id")},
    )


def read_phrasecut(
    folder: Path, *, image_root: Path, name: str = "phrasecut", task: str = "phrasecut", splits: Sequence[str] | None = None
) -> dict[str, ReferringDataset]:
    """Read ``refer_<split>.json`` files of ``folder`` -> {split: dataset}.

    Args:
        image_root: folder holding ``<image_id>.jpg``.
        splits: splits to read; None reads every ``refer_*.json`` present.
    """
    folder, image_root = Path(folder), Path(image_root)
    available = sorted(path.stem.removeprefix("refer_") for path in folder.glob("refer_*.json")) if folder.is_dir() else []
    if not available:
        raise DatasetError(f"{folder}: no refer_<split>.json file found")
    sizes = _image_sizes(folder)
    datasets = {}
    for split in select_splits(splits, available, str(folder)):
        path = folder / f"refer_{split}.json"
        tasks = load_json(path)
        if not isinstance(tasks, list):
            raise DatasetError(f"{path}: expected a list of tasks")
        problems = ProblemLog(str(path))
        samples = [
            _sample_from_task(entry, index, name=name, image_root=image_root, sizes=sizes, source=path.name, problems=problems)
            for index, entry in enumerate(tasks)
        ]
        problems.raise_if_any()
        datasets[split] = ReferringDataset(name, split, task, [sample for sample in samples if sample is not None])
    return datasets
