"""One split of a semantic-segmentation dataset: image files, label maps and a class-name list.

Every OVSS benchmark as the field prepares it (CAT-Seg's / detectron2's ``prepare_*.py``) and the
generic "images + label PNGs + class names" format are the same thing: a folder of label maps
(single-channel PNG, or 16-bit TIFF for ADE20K-847 and PC-459) whose values index a class list, a
folder of images with the same file stems, and one ignore value. The label folder decides the
samples (as detectron2's ``load_sem_seg`` pairs files): Pascal's ``JPEGImages`` also holds the
training images, which have no validation label and are not samples.

:class:`SemSegDataset` is a ``torch.utils.data.Dataset``: item i is

- ``"image"``: uint8 (3, H, W), RGB;
- ``"label"``: int64 (H, W), class index or :data:`IGNORE_INDEX` (-1) where the file holds the
  dataset's ignore value (255, 65535 or 459 become one value, so a training loop and the metrics
  need not know which dataset they see);
- ``"index"``: i.

The class names (the text a model is prompted with) are the dataset's, the same for every item:
``dataset.class_names``. Resizing, cropping and batching are the training loop's business.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ...data.masks import read_image_size
from ...data.records import ProblemLog
from ...errors import DatasetError, ImageError
from ...image_io import load_image
from ..metrics import ConfusionMatrix

IGNORE_INDEX = -1
# PIL modes of single-channel integer images: 8-bit, palette (values are the palette indices),
# 16-bit (ADE20K-847's and PC-459's TIFFs) and 32-bit.
_LABEL_MODES = ("L", "P", "I;16", "I;16L", "I;16B", "I")


@dataclass(frozen=True)
class SemSegSample:
    """An image, its label map, the class list its values index, and the value meaning "not labelled"."""

    image_path: Path
    label_path: Path
    class_names: tuple[str, ...]
    ignore_value: int


def read_label_map(path: Path, ignore_value: int, num_classes: int, image_size: tuple[int, int] | None = None) -> np.ndarray:
    """The label file as int64 (H, W), its values checked.

    Args:
        path: single-channel PNG or TIFF.
        ignore_value: the value that marks unlabelled pixels.
        num_classes: label values must lie in [0, num_classes) unless they are ``ignore_value``.
        image_size: (H, W) the label must have (its image's), or None not to check.

    Raises:
        DatasetError: one line naming the file: unreadable, not single-channel, another size than
            its image, or values outside the class range.
    """
    try:
        with Image.open(path) as image:
            if image.mode not in _LABEL_MODES:
                raise DatasetError(f"{path}: a label map must be a single-channel integer image, got PIL mode {image.mode}")
            labels = np.asarray(image).astype(np.int64)
    except FileNotFoundError:
        raise DatasetError(f"{path}: label file not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DatasetError(f"{path}: not a readable label image ({exc})") from exc
    if image_size is not None and labels.shape != tuple(image_size):
        raise DatasetError(
            f"{path}: label map is {labels.shape[0]}x{labels.shape[1]} (HxW) but its image is {image_size[0]}x{image_size[1]}"
        )
    outside = ((labels < 0) | (labels >= num_classes)) & (labels != ignore_value)
    if outside.any():
        values = np.unique(labels[outside])
        shown = ", ".join(str(v) for v in values[:5]) + (", ..." if len(values) > 5 else "")
        raise DatasetError(
            f"{path}: label values {shown} are outside the {num_classes} classes (0..{num_classes - 1}) and not the ignore value {ignore_value}"
        )
    return labels


def pair_files(
    image_dir: Path, label_dir: Path, image_ext: str, label_ext: str, orphans: list[str] | None = None
) -> list[tuple[Path, Path]]:
    """(image, label) pairs, one per label file in ``label_dir`` (sorted), the image by the same stem.

    ``orphans``: given (check_data.py), a label without its image is described there and left out
    instead of stopping the whole split, so the other pairs can still be checked.

    Raises:
        DatasetError: a folder is missing, there is no label file, or labels have no image (all listed;
            with ``orphans`` only when no label has one).
    """
    missing = [f"{folder}: {what} folder not found" for folder, what in ((image_dir, "image"), (label_dir, "label")) if not folder.is_dir()]
    if missing:
        raise DatasetError("; ".join(missing))
    labels = sorted(entry.name for entry in os.scandir(label_dir) if entry.name.endswith(label_ext) and entry.is_file())
    if not labels:
        raise DatasetError(f"{label_dir}: no *{label_ext} label files")
    images = {entry.name for entry in os.scandir(image_dir)}
    problems = ProblemLog(str(label_dir))
    pairs = []
    for name in labels:
        image_name = name[: -len(label_ext)] + image_ext
        if image_name not in images:
            problems.add(f"{name} has no image {image_dir / image_name}")
        else:
            pairs.append((image_dir / image_name, label_dir / name))
    if orphans is None or not pairs:
        problems.raise_if_any()
    else:
        orphans.extend(f"{label_dir}: {message}" for message in problems.messages)
    return pairs


class SemSegDataset(torch.utils.data.Dataset):
    """One split: samples in label-file order, and how its labels are scored.

    Args:
        name: dataset name ("ade20k_150", ...).
        split: split name ("validation", "train2017", ...).
        pairs: (image path, label path) per sample.
        class_names: the vocabulary a model is prompted with; label value i is ``class_names[i]``.
        ignore_value: the label files' value for unlabelled pixels.
        background_from: PAS-20b only: the vocabulary's classes from this index on are
            background stand-ins; label value ``background_from`` is "background" and predictions
            of any class >= it are scored as background (metrics.md). None otherwise.
        unseen_classes: names held out of training (ShapeWorld-OVSS), scored separately.
    """

    def __init__(
        self,
        name: str,
        split: str,
        pairs: Sequence[tuple[Path, Path]],
        class_names: Sequence[str],
        ignore_value: int,
        background_from: int | None = None,
        unseen_classes: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.split = split
        self.class_names = tuple(class_names)
        self.ignore_value = int(ignore_value)
        if background_from is not None and not 0 < background_from < len(self.class_names):
            raise DatasetError(f"dataset {name}: background_from={background_from} must lie in 1..{len(self.class_names) - 1}")
        self.background_from = background_from
        self.unseen_classes = tuple(unseen_classes)
        self.samples = tuple(SemSegSample(image, label, self.class_names, self.ignore_value) for image, label in pairs)
        # Label value -> the value items carry (IGNORE_INDEX: not scored); None: the file's values
        self._label_lookup: np.ndarray | None = None

    def without_unseen(self) -> SemSegDataset:
        """This split with its unseen classes' names left out, for training in the inductive zero-shot
        protocol: ``class_names`` keeps the seen names in their order, items' labels are renumbered onto
        them and an unseen class's pixels are ignored (ShapeWorld-OVSS's training split has none: the
        ignore is the rule for lists that name unseen classes of a split that shows them). ``self`` when
        nothing is unseen."""
        if not self.unseen_classes:
            return self
        if self.background_from is not None:
            raise DatasetError(f"dataset {self.name}: unseen classes together with background_from are not supported")
        seen = tuple(name for name in self.class_names if name not in self.unseen_classes)
        lookup = np.full(len(self.class_names), IGNORE_INDEX, dtype=np.int64)
        lookup[[self.class_names.index(name) for name in seen]] = np.arange(len(seen))
        dataset = SemSegDataset(self.name, self.split, [], seen, self.ignore_value)
        dataset.samples = self.samples  # their files index the whole list; __getitem__ renumbers
        dataset._label_lookup = lookup
        return dataset

    @property
    def label_class_names(self) -> tuple[str, ...]:
        """What each label value (and each row of the confusion matrix) means."""
        if self.background_from is None:
            return self.class_names
        return self.class_names[: self.background_from] + ("background",)

    @property
    def unseen_indices(self) -> tuple[int, ...]:
        """Label values of the unseen classes (for ``ConfusionMatrix.compute(unseen=...)``)."""
        return tuple(self.label_class_names.index(name) for name in self.unseen_classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return f"SemSegDataset(name={self.name!r}, split={self.split!r}, classes={len(self.class_names)}, samples={len(self)})"

    def read_label(self, index: int, image_size: tuple[int, int] | None = None) -> np.ndarray:
        """Label map of sample ``index`` with the file's values, int64 (H, W), checked (see :func:`read_label_map`)."""
        sample = self.samples[index]
        if image_size is None:
            try:
                image_size = read_image_size(sample.image_path)
            except ImageError as exc:
                raise DatasetError(str(exc)) from exc
        values = len(self.label_class_names) if self._label_lookup is None else len(self._label_lookup)
        return read_label_map(sample.label_path, self.ignore_value, values, image_size)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        try:
            image = load_image(sample.image_path)
        except ImageError as exc:
            raise DatasetError(str(exc)) from exc
        labels = self.read_label(index, image.shape[:2])
        labels[labels == self.ignore_value] = IGNORE_INDEX
        if self._label_lookup is not None:
            labelled = labels != IGNORE_INDEX
            labels[labelled] = self._label_lookup[labels[labelled]]
        return {
            "image": torch.from_numpy(image).permute(2, 0, 1).contiguous(),
            "label": torch.from_numpy(labels),
            "index": index,
        }

    def confusion_matrix(self, device: torch.device | str | None = None) -> ConfusionMatrix:
        """An empty confusion matrix that scores this dataset's items (its classes, ignore and PAS-20b rule)."""
        return ConfusionMatrix(
            len(self.label_class_names), ignore_index=IGNORE_INDEX, background_from=self.background_from, device=device
        )
