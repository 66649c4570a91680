"""``check_data.py``'s OVSS part: read every image and label map of a split and report what is wrong.

Problems are grouped by kind (unreadable images, label maps that cannot be used: another size than
their image, values beyond the class list that are not the ignore value, not a single-channel
image), each group with its count and the first offending files, so one run shows everything.
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
    dataset = load_ovss_dataset(cfg)
    print(
        f"  split {dataset.split}: {len(dataset)} images, {len(dataset.class_names)} class names, "
        f"{len(dataset.label_class_names)} label classes, ignore value {dataset.ignore_value}"
        + (f", {len(dataset.unseen_classes)} unseen classes" if dataset.unseen_classes else "")
    )
    bad_images, bad_labels = [], []
    for index, sample in enumerate(tqdm(dataset.samples, desc="images and labels", file=sys.stderr, disable=None, leave=False)):
        try:
            size = load_image(sample.image_path).shape[:2]
        except ImageError as exc:
            bad_images.append(str(exc))
            continue
        try:
            dataset.read_label(index, size)
        except DatasetError as exc:
            bad_labels.append(str(exc))
    if bad_images:
        report.problem(f"{len(bad_images)} of {len(dataset)} images unreadable", bad_images)
    if bad_labels:
        report.problem(f"{len(bad_labels)} of {len(dataset)} label maps unusable", bad_labels)
    if not (bad_images or bad_labels):
        report.ok(f"{len(dataset)} images and label maps readable, of equal sizes, labels within the classes")
