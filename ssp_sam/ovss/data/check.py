"""``check_data.py``'s OVSS part: read every image and label map of a split and report what is wrong.

Problems are grouped by kind (label files without their image, unreadable images, label maps that
cannot be used: another size than their image, values beyond the class list that are not the ignore
value, not a single-channel image; for a dataset with a background class, label maps that never show
it), each group with its count and the first offending files, so one run shows everything.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Protocol

from tqdm import tqdm

from ...errors import DatasetError, ImageError
from ...image_io import load_image
from .registry import load_ovss_dataset


class Report(Protocol):
    def ok(self, message: str) -> None: ...

    def problem(self, message: str, items: list | None = None) -> None: ...


def check_ovss_dataset(cfg: Mapping, report: Report) -> None:
    """Load the split of ``cfg`` (class list, folders, image for every label), then decode every file.

    Raises:
        DatasetError: the split cannot be loaded at all (missing folder, bad class list, ...).
    """
    orphans: list[str] = []
    dataset = load_ovss_dataset(cfg, orphans)
    print(
        f"  split {dataset.split}: {len(dataset)} images, {len(dataset.class_names)} class names, "
        f"{len(dataset.label_class_names)} label classes, ignore value {dataset.ignore_value}"
        + (f", {len(dataset.unseen_classes)} unseen classes" if dataset.unseen_classes else "")
    )
    bad_images, bad_labels = [], []
    background_seen = False
    for index, sample in enumerate(tqdm(dataset.samples, desc="images and labels", file=sys.stderr, disable=None, leave=False)):
        try:
            size = load_image(sample.image_path).shape[:2]
        except ImageError as exc:
            bad_images.append(str(exc))
            continue
        try:
            label = dataset.read_label(index, size)
        except DatasetError as exc:
            bad_labels.append(str(exc))
            continue
        background_seen = background_seen or (dataset.background_from is not None and bool((label == dataset.background_from).any()))
    if orphans:
        report.problem(f"{len(orphans)} label files without their image (left out of the checks below)", orphans)
    if dataset.background_from is not None and not background_seen and len(bad_labels) < len(dataset):
        # VOC-20b read from VOC-20's folder (annotations_detectron2, no background) would score without its background class
        report.problem(
            f"no label map has the background value {dataset.background_from} (background_from): a label folder "
            "without background (for PAS-20b CAT-Seg's annotations_detectron2_bg, not annotations_detectron2)?"
        )
    if bad_images:
        report.problem(f"{len(bad_images)} of {len(dataset)} images unreadable", bad_images)
    if bad_labels:
        report.problem(f"{len(bad_labels)} of {len(dataset)} label maps unusable", bad_labels)
    if not (bad_images or bad_labels or orphans):
        report.ok(f"{len(dataset)} images and label maps readable, of equal sizes, labels within the classes")
