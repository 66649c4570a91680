"""What every dataset reader returns: referring samples and a dataset (one split) of them.

A :class:`ReferringSample` is one referent (a RefCOCO ref, a gRefCOCO ref, a PhraseCut task, a
JSONL line) with all the sentences that describe it. Evaluation treats every sentence as its own
sample (:meth:`ReferringDataset.per_sentence`); training picks one sentence at random per visit.
(A REC pretraining split can hold one sample per sentence instead: ``sentence_samples.py``.)
Masks are not decoded at load time: a sample holds a small target object (see ``masks.py``) and
decodes it in :meth:`ReferringSample.mask`.

This module also holds the two helpers all readers share: xywh -> xyxy box conversion and
:class:`ProblemLog`, which gathers every malformed entry of a file so that one error lists them
all instead of stopping at the first.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, overload

import numpy as np

from ..errors import DatasetError
from .masks import read_image_size

BoxXYXY = tuple[float, float, float, float]
TASKS = ("res", "gres", "phrasecut")


class TargetMask(Protocol):
    """Anything that draws a referent on an (H, W) canvas -> bool (H, W)."""

    def decode(self, height: int, width: int) -> np.ndarray: ...


def box_numbers(box: Any, label: str, layout: str) -> tuple[float, float, float, float]:
    """The four finite numbers of a box given as a list, e.g. ``layout="x, y, w, h"`` (for messages)."""
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise DatasetError(f"{label}: a box must be [{layout}], got {box!r}")
    try:
        a, b, c, d = (float(v) for v in box)
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{label}: box with non-numeric values {box!r}") from exc
    if not all(math.isfinite(v) for v in (a, b, c, d)):
        raise DatasetError(f"{label}: box must be finite, got {box!r}")
    return a, b, c, d


def xywh_to_xyxy(box: Any, label: str) -> BoxXYXY:
    """COCO box [x, y, w, h] (pixels) -> (x1, y1, x2, y2) with x2 = x + w, y2 = y + h."""
    x, y, w, h = box_numbers(box, label, "x, y, w, h")
    if w < 0 or h < 0:
        raise DatasetError(f"{label}: box must be finite with w, h >= 0, got {box!r}")
    return (x, y, x + w, y + h)


class ProblemLog:
    """Collects malformed entries of one source file; :meth:`raise_if_any` reports them together."""

    shown = 5

    def __init__(self, source: str) -> None:
        self.source = source
        self.messages: list[str] = []

    def add(self, message: str) -> None:
        self.messages.append(message)

    def raise_if_any(self) -> None:
        """Raise one DatasetError naming the file, the count and the first few problems."""
        if not self.messages:
            return
        count = len(self.messages)
        first = "; ".join(self.messages[: self.shown])
        more = f" (and {count - self.shown} more)" if count > self.shown else ""
        raise DatasetError(f"{self.source}: {count} problem{'s' if count > 1 else ''}: {first}{more}")


def select_splits(requested: Sequence[str] | None, available: Sequence[str], source: str) -> list[str]:
    """The splits to build: all available ones if ``requested`` is None.

    Raises:
        DatasetError: a requested split is not in the files; the message lists the available ones.
    """
    if requested is None:
        return list(available)
    for split in requested:
        if split not in available:
            listed = ", ".join(available) if available else "none"
            raise DatasetError(f"{source}: unknown split {split!r}; available splits: {listed}")
    return list(requested)


@dataclass(frozen=True)
class ReferringSample:
    """One referent and every sentence that describes it.

    Attributes:
        sample_id: unique within its dataset (e.g. the ref id; ``"<dataset>/<ref id>"`` when merged).
        image_id: the image's id in its dataset.
        image_path: image file (image root joined with the annotation's file name).
        expressions: all sentences of the referent, stripped, never empty.
        sentence_ids: ids of those sentences, same length as ``expressions``.
        ann_ids: annotation (instance) ids of the referent's target; empty for no-target and for
            sources without instance ids (JSONL, merge.json). gRefCOCO's crowd annotations are
            not in the target; their ids are in ``meta["crowd_ann_ids"]``.
        boxes_xyxy: one (x1, y1, x2, y2) box in original-image pixels per target instance
            (gRefCOCO: plus the ref's crowd annotations' boxes unless crowd_in_boxes is off).
        no_target: the expression refers to nothing in the image (gRefCOCO, JSONL).
        target: draws the GT mask; None when the source only gives boxes (REC data).
        size_hint: (H, W) as stated by the annotation file, or None to read it from the image
            header on first use (PhraseCut, JSONL).
        meta: everything else: "dataset", "ref_id", "category_ids", unknown keys of the source
            record passed through, and "sentence_meta" (one dict per sentence of its unknown
            keys, e.g. ShapeWorld's "kind").
    """

    sample_id: str
    image_id: int | str
    image_path: Path
    expressions: tuple[str, ...]
    sentence_ids: tuple[int, ...]
    ann_ids: tuple[int, ...]
    boxes_xyxy: tuple[BoxXYXY, ...]
    no_target: bool
    target: TargetMask | None
    size_hint: tuple[int, int] | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.expressions:
            raise DatasetError(f"sample {self.sample_id}: no expressions")
        if len(self.sentence_ids) != len(self.expressions):
            raise DatasetError(f"sample {self.sample_id}: {len(self.sentence_ids)} sentence ids for {len(self.expressions)} expressions")

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the original image (from the annotations, else from the file header, cached)."""
        return self.size_hint if self.size_hint is not None else read_image_size(self.image_path)

    @property
    def has_mask(self) -> bool:
        """False for box-only (REC) samples, whose :meth:`mask` cannot be drawn."""
        return self.target is not None

    def mask(self) -> np.ndarray:
        """GT mask, bool (H, W): union of the referent's instances; all False for no-target."""
        if self.target is None:
            raise DatasetError(f"sample {self.sample_id} ({self.image_path}): boxes only, no mask annotation")
        height, width = self.image_size
        return self.target.decode(height, width)

    def union_box_xyxy(self) -> BoxXYXY:
        """Box around all target instances; (0, 0, 0, 0) for no-target, from the mask if no boxes given."""
        if self.no_target:
            return (0.0, 0.0, 0.0, 0.0)
        if self.boxes_xyxy:
            boxes = np.asarray(self.boxes_xyxy, dtype=np.float64)
            x1, y1 = boxes[:, :2].min(axis=0)
            x2, y2 = boxes[:, 2:].max(axis=0)
            return (float(x1), float(y1), float(x2), float(y2))
        rows, cols = np.nonzero(self.mask())
        if rows.size == 0:
            return (0.0, 0.0, 0.0, 0.0)
        return (float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1))

    def sentence_meta(self, index: int) -> Mapping[str, Any]:
        """Unknown keys of sentence ``index`` (e.g. {"kind": "L"}); {} if the source has none."""
        per_sentence = self.meta.get("sentence_meta", ())
        return per_sentence[index] if index < len(per_sentence) else {}


class ReferringDataset(Sequence[ReferringSample]):
    """One split of one dataset: samples (one per referent) in file order.

    Args:
        name: dataset name ("refcoco", "grefcoco", ...).
        split: split name as found in the files ("val", "testA", ...).
        task: "res", "gres" or "phrasecut" (how it is evaluated).
        samples: the referents; their sample ids must be unique.
    """

    def __init__(self, name: str, split: str, task: str, samples: Sequence[ReferringSample]) -> None:
        if task not in TASKS:
            raise DatasetError(f"dataset {name}: unknown task {task!r}; expected one of {', '.join(TASKS)}")
        self.name = name
        self.split = split
        self.task = task
        self._samples = tuple(samples)
        seen: set[str] = set()
        for sample in self._samples:
            if sample.sample_id in seen:
                raise DatasetError(f"dataset {name} split {split}: sample id {sample.sample_id!r} occurs twice")
            seen.add(sample.sample_id)

    @property
    def samples(self) -> tuple[ReferringSample, ...]:
        return self._samples

    def __len__(self) -> int:
        return len(self._samples)

    @overload
    def __getitem__(self, index: int) -> ReferringSample: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[ReferringSample, ...]: ...

    def __getitem__(self, index):
        return self._samples[index]

    def __iter__(self) -> Iterator[ReferringSample]:
        return iter(self._samples)

    def __repr__(self) -> str:
        return f"ReferringDataset(name={self.name!r}, split={self.split!r}, task={self.task!r}, samples={len(self)})"

    def num_sentences(self) -> int:
        return sum(len(sample.expressions) for sample in self._samples)

    def per_sentence(self) -> list[tuple[ReferringSample, int]]:
        """Evaluation order: (sample, sentence index) for every sentence of every referent."""
        return [(sample, index) for sample in self._samples for index in range(len(sample.expressions))]

    def image_ids(self) -> list[int | str]:
        """Distinct image ids in order of first appearance."""
        return list(dict.fromkeys(sample.image_id for sample in self._samples))

    def image_paths(self) -> list[Path]:
        """Distinct image files in order of first appearance."""
        return list(dict.fromkeys(sample.image_path for sample in self._samples))
