"""Evaluation arithmetic of referring expression segmentation: RES, GRES (gRefCOCO) and the SSP-SAM release's.

The definitions are the field's (see metrics.md in the project specs); results are only comparable with
published tables when they are followed exactly. The classes here only count: they score whatever pair
of masks they are given. Where the masks are compared (original resolution, the release's 512x512
padded frame, ReLA's 480x480) is the evaluation protocol's business (``ssp_sam.engine.protocols``).

- :class:`RESMetrics`: mIoU, oIoU, Pr@X (IoU >= X) and REC box accuracy.
- :class:`GRESMetrics`: the gRefCOCO protocol as ReLA computes it (gIoU, cIoU, N-acc, T-acc, Pr@X).
- :class:`SSPSAMReleaseMetrics`: the released SSP-SAM evaluator's own arithmetic, quirks included,
  under keys ending in " (SSP-SAM release)" so that it is never mistaken for the standard numbers.

Every metric object keeps one small record per sample (plain Python lists of ints, floats, bools and
strings) instead of running sums, so that the same accumulation can be

- broken down by group (``compute(group=...)``, ``compute_by_group()``),
- merged across DDP ranks: all_gather ``state_dict()`` from every rank, rebuild with ``from_state_dict()``
  and ``merge()`` them (records are concatenated; a sampler that pads ranks with repeated samples,
  like ``DistributedSampler``, must have its repeats dropped by the caller, e.g. with ``sample_id``),
- dumped sample by sample (``per_sample()``).

Conventions where the definitions are silent:

- A ratio with a zero denominator is 0: IoU_i = 0 when U_i = 0 (as metrics.md says), and likewise
  oIoU / cIoU = 0 when the summed union is 0.
- A key whose sample population is empty is left out of ``compute()`` rather than set to NaN:
  GRES "N-acc" without no-target samples; "T-acc" and "Pr@X" without target samples; RES "REC-acc"
  when no boxes were given.
- ``compute()`` on zero samples (or an unknown group) raises ValueError.
- Counts ("n_samples", "n_target", "n_no_target") are ints; every other value is a float in [0, 1].
- IoU >= X is decided on float64 I / U against the decimal X: exact, because a pixel-count ratio
  that is not X differs from it by at least 1 / (20 U), far above float64 rounding.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_iou

Mask = np.ndarray | torch.Tensor

PRECISION_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
PRECISION_KEYS = tuple(f"Pr@{threshold}" for threshold in PRECISION_THRESHOLDS)
REC_IOU_THRESHOLD = 0.5

# The released evaluator's thresholds 0.5:0.05:0.9 (engine.py: 0.5 + 0.05 i in float32, where an IoU of
# exactly 0.7 reaches 0.7; float64 0.5 + 0.05 * 4 would not, hence the rounding to the decimals).
RELEASE_SUFFIX = " (SSP-SAM release)"
RELEASE_PRECISION_THRESHOLDS = tuple(round(0.5 + 0.05 * step, 2) for step in range(9))
RELEASE_PRECISION_KEYS = tuple(f"Pr@{threshold}{RELEASE_SUFFIX}" for threshold in RELEASE_PRECISION_THRESHOLDS)

RES_KEYS = ("mIoU", "oIoU", *PRECISION_KEYS, "REC-acc")
GRES_KEYS = ("gIoU", "cIoU", "N-acc", "T-acc", *PRECISION_KEYS)
RELEASE_RES_KEYS = (f"mIoU{RELEASE_SUFFIX}", f"oIoU{RELEASE_SUFFIX}", *RELEASE_PRECISION_KEYS)
RELEASE_GRES_KEYS = (*(f"{key}{RELEASE_SUFFIX}" for key in ("gIoU", "cIoU", "N-acc", "T-acc")), *RELEASE_PRECISION_KEYS)


def _as_array(mask: Mask) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        return mask.detach().cpu().numpy()
    return np.asarray(mask)


def _as_bool_mask(mask: np.ndarray, name: str) -> np.ndarray:
    if mask.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) mask, got shape {tuple(mask.shape)}")
    if mask.dtype == np.bool_:
        return mask
    if not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(
            f"{name} must be boolean or integer (non-zero = foreground), got dtype {mask.dtype}; "
            "threshold probabilities or logits before scoring"
        )
    return mask != 0


def _mask_pair(pred: Mask, gt: Mask) -> tuple[np.ndarray, np.ndarray]:
    """Both masks as boolean (H, W) numpy arrays, checked to have the same shape."""
    pred_array, gt_array = _as_array(pred), _as_array(gt)
    if pred_array.shape != gt_array.shape:
        raise ValueError(
            f"pred mask shape {tuple(pred_array.shape)} differs from gt mask shape {tuple(gt_array.shape)}; "
            "bring both into the protocol's frame first"
        )
    return _as_bool_mask(pred_array, "pred mask"), _as_bool_mask(gt_array, "gt mask")


def _count_intersection_union(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    return int(np.count_nonzero(pred & gt)), int(np.count_nonzero(pred | gt))


def intersection_union(pred: Mask, gt: Mask) -> tuple[int, int]:
    """Pixel counts I = |pred AND gt| and U = |pred OR gt| of two (H, W) masks.

    Masks are numpy arrays or torch tensors (any device), boolean or integer with non-zero as
    foreground; float masks are refused because probabilities must be thresholded by the caller.
    """
    return _count_intersection_union(*_mask_pair(pred, gt))


def _as_box(box: Any, name: str) -> torch.Tensor:
    """A box as a (1, 4) float64 xyxy tensor, checked to be finite and not inverted."""
    box = torch.as_tensor(box).detach().to("cpu", torch.float64)
    if box.numel() != 4:
        raise ValueError(f"{name} must hold 4 numbers (x1, y1, x2, y2), got shape {tuple(box.shape)}")
    box = box.reshape(1, 4)
    x1, y1, x2, y2 = box[0].tolist()
    if not torch.isfinite(box).all() or x2 < x1 or y2 < y1:
        raise ValueError(f"{name} must be a finite xyxy box with x2 >= x1 and y2 >= y1, got {[x1, y1, x2, y2]}")
    return box


def _box_iou(pred_box: Any, gt_box: Any) -> float:
    """IoU of two xyxy pixel boxes; 0 when both are degenerate (zero union), as for masks."""
    iou = box_iou(_as_box(pred_box, "pred_box"), _as_box(gt_box, "gt_box"))[0, 0]
    return float(torch.nan_to_num(iou, nan=0.0))


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / float(denominator) if denominator > 0 else 0.0


def _per_sample_iou(intersections: np.ndarray, unions: np.ndarray) -> np.ndarray:
    """IoU_i = I_i / U_i, 0 where U_i = 0. Shapes (N,) -> (N,) float64."""
    intersections = intersections.astype(np.float64)
    return np.divide(intersections, unions, out=np.zeros_like(intersections), where=unions > 0)


def _precision_at(ious: np.ndarray, thresholds: Sequence[float], keys: Sequence[str]) -> dict[str, float]:
    """Pr@X: fraction of IoU_i >= X, for every X of ``thresholds`` (named by ``keys``). ious: (N,)."""
    return {key: float(np.mean(ious >= threshold)) for key, threshold in zip(keys, thresholds)}


def _check_group(group: str | None) -> None:
    if group is not None and not (isinstance(group, str) and group):
        raise ValueError(f"group must be a non-empty string or None, got {group!r}")


def _check_sample_id(sample_id: str | int | None) -> None:
    if sample_id is not None and (isinstance(sample_id, bool) or not isinstance(sample_id, (str, int))):
        raise ValueError(f"sample_id must be a string, an int or None, got {sample_id!r}")


class _PerSampleMetrics(ABC):
    """Per-sample records stored column-wise in plain lists, with grouping, merging and state.

    Every sample records its ``sample_id``, ``group`` and mask counts ``I`` and ``U``; subclasses
    name their further columns in ``_extra_columns``, append one row per ``update`` through
    ``_append``, and turn selected rows into numbers in ``_summarize``.
    """

    _extra_columns: tuple[str, ...] = ()

    def __init__(self) -> None:
        columns = ("sample_id", "group", "I", "U", *self._extra_columns)
        self._records: dict[str, list] = {name: [] for name in columns}

    def __len__(self) -> int:
        return len(self._records["group"])

    def _config(self) -> dict[str, Any]:
        """Constructor arguments; two accumulations merge only when these are equal."""
        return {}

    def _append(self, group: str | None, sample_id: str | int | None, **values: Any) -> None:
        _check_group(group)
        _check_sample_id(sample_id)
        for name, value in {"sample_id": sample_id, "group": group, **values}.items():
            self._records[name].append(value)

    def _select(self, group: str | None) -> dict[str, list]:
        if group is None:
            rows = self._records
        else:
            if group not in self._records["group"]:
                raise ValueError(f"unknown group {group!r}; known groups: {self.groups()}")
            keep = [index for index, name in enumerate(self._records["group"]) if name == group]
            rows = {name: [column[index] for index in keep] for name, column in self._records.items()}
        if not rows["group"]:
            raise ValueError(f"{type(self).__name__}.compute(): no samples accumulated")
        return rows

    @staticmethod
    def _counts(rows: dict[str, list]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """I, U and IoU of the rows as arrays of shape (N,)."""
        intersections = np.asarray(rows["I"], dtype=np.int64)
        unions = np.asarray(rows["U"], dtype=np.int64)
        return intersections, unions, _per_sample_iou(intersections, unions)

    @abstractmethod
    def _summarize(self, rows: dict[str, list]) -> dict[str, float | int]:
        """The metrics of the given rows (the columns of the per-sample records)."""

    def _derived(self, rows: dict[str, list]) -> dict[str, list]:
        """Per-sample values computed from the records, added to ``per_sample()``."""
        return {"IoU": self._counts(rows)[2].tolist()}

    def _check_mergeable(self, other: _PerSampleMetrics) -> None:
        """Extra conditions for ``merge``; none by default."""

    def compute(self, group: str | None = None) -> dict[str, float | int]:
        """Metrics over all samples, or over the samples of one group."""
        return self._summarize(self._select(group))

    def groups(self) -> list[str]:
        """Sorted names of the groups seen so far (samples without a group belong to none)."""
        return sorted({name for name in self._records["group"] if name is not None})

    def compute_by_group(self) -> dict[str, dict[str, float | int]]:
        """``{group: compute(group)}`` for every group, in sorted order."""
        return {name: self.compute(name) for name in self.groups()}

    def per_sample(self) -> list[dict[str, Any]]:
        """One dict per sample, in accumulation order: sample_id, group, the records and derived values."""
        columns = {**self._records, **self._derived(self._records)}
        return [dict(zip(columns, values)) for values in zip(*columns.values())]

    def state_dict(self) -> dict[str, Any]:
        """Picklable state (plain lists) for ``torch.distributed.all_gather_object`` or a JSON dump."""
        return {
            "metric": type(self).__name__,
            "config": self._config(),
            "records": {name: list(column) for name, column in self._records.items()},
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]):
        """Rebuild an accumulation from ``state_dict()`` output (e.g. another rank's)."""
        if state.get("metric") != cls.__name__:
            raise ValueError(f"state_dict of {state.get('metric')!r} cannot be loaded into {cls.__name__}")
        metrics = cls(**state["config"])
        records = state["records"]
        if set(records) != set(metrics._records):
            raise ValueError(
                f"{cls.__name__} state_dict has record columns {sorted(records)}, expected {sorted(metrics._records)}"
            )
        lengths = {name: len(column) for name, column in records.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"{cls.__name__} state_dict has record columns of unequal lengths {lengths}")
        metrics._records = {name: list(records[name]) for name in metrics._records}
        return metrics

    def merge(self, other: _PerSampleMetrics) -> None:
        """Append the records of ``other`` (same class and configuration) to this accumulation."""
        if type(other) is not type(self):
            raise ValueError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        if other._config() != self._config():
            raise ValueError(f"cannot merge {type(self).__name__} with config {other._config()} into {self._config()}")
        self._check_mergeable(other)
        for name, column in self._records.items():
            column.extend(other._records[name])


class RESMetrics(_PerSampleMetrics):
    """Referring expression segmentation (one expression, one target): mIoU, oIoU, Pr@X, REC-acc.

    ``update`` takes one sample: the predicted and GT masks (in the protocol's frame), and
    optionally the predicted and GT boxes (xyxy pixels) for the REC box accuracy (a hit is a box
    IoU >= 0.5). Boxes are given for every sample or for none, so that "REC-acc" always covers
    all samples.
    """

    _extra_columns = ("box_IoU",)

    def _has_boxes(self) -> bool:
        return self._records["box_IoU"][0] is not None

    def update(
        self,
        pred_mask: Mask,
        gt_mask: Mask,
        pred_box: Any = None,
        gt_box: Any = None,
        group: str | None = None,
        sample_id: str | int | None = None,
    ) -> None:
        if (pred_box is None) != (gt_box is None):
            raise ValueError("pred_box and gt_box must be given together (or both left as None)")
        with_box = pred_box is not None
        if len(self) and with_box != self._has_boxes():
            raise ValueError(
                "boxes must be given for all samples or for none: this sample "
                f"{'has' if with_box else 'has no'} boxes, the earlier ones {'do' if self._has_boxes() else 'do not'}"
            )
        intersection, union = intersection_union(pred_mask, gt_mask)
        box_iou_value = _box_iou(pred_box, gt_box) if with_box else None
        self._append(group, sample_id, I=intersection, U=union, box_IoU=box_iou_value)

    def _check_mergeable(self, other: RESMetrics) -> None:
        if len(self) and len(other) and self._has_boxes() != other._has_boxes():
            raise ValueError("cannot merge an accumulation with boxes and one without boxes")

    def _summarize(self, rows: dict[str, list]) -> dict[str, float | int]:
        intersections, unions, ious = self._counts(rows)
        summary: dict[str, float | int] = {
            "n_samples": len(ious),
            "mIoU": float(ious.mean()),
            "oIoU": _ratio(intersections.sum(), unions.sum()),
            **_precision_at(ious, PRECISION_THRESHOLDS, PRECISION_KEYS),
        }
        if rows["box_IoU"][0] is not None:
            box_ious = np.asarray(rows["box_IoU"], dtype=np.float64)
            summary["REC-acc"] = float(np.mean(box_ious >= REC_IOU_THRESHOLD))
        return summary


def _mask_counts(pred_mask: Mask, gt_mask: Mask) -> tuple[int, int, bool, int]:
    """I, U, whether the GT has a target, and the predicted area of one (pred, gt) pair."""
    pred, gt = _mask_pair(pred_mask, gt_mask)
    intersection, union = _count_intersection_union(pred, gt)
    return intersection, union, bool(gt.any()), int(np.count_nonzero(pred))


class GRESMetrics(_PerSampleMetrics):
    """Generalized RES, the gRefCOCO protocol as ReLA computes it: gIoU, cIoU, N-acc, T-acc and Pr@X.

    A sample is no-target when its annotation says so (else when its GT mask is empty). ``update`` takes the predicted mask and the
    model's no-target decision (SSP-SAM has no no-target head: its decision is an almost empty
    mask, ``Prediction.no_target``). Per sample, as ReLA's evaluator:

    - target, said "target": I and U of the masks; score I / U.
    - target, said "no target": I = 0, U = |pred OR gt| kept; score 0.
    - no-target, said "no target": adds nothing to cIoU; score 1.
    - no-target, said "target": I = 0, U = |pred| (the GT is empty); score 0.

    gIoU is the mean score, cIoU = sum I / sum U, Pr@X is over target samples (score >= X).
    "N-acc" is left out without no-target samples, "T-acc" and "Pr@X" without target samples.
    """

    _extra_columns = ("target", "pred_no_target")

    def update(
        self,
        pred_mask: Mask,
        gt_mask: Mask,
        pred_no_target: bool,
        group: str | None = None,
        sample_id: str | int | None = None,
        gt_no_target: bool | None = None,
    ) -> None:
        """Score one sample. ``gt_no_target``: the annotation's own no-target flag, which decides the
        sample's kind as ReLA's evaluator does (its ``empty`` flag): a tiny target whose mask rasterises
        to no pixel in the evaluation frame stays a target. None: an empty ``gt_mask`` means no target."""
        if isinstance(pred_no_target, torch.Tensor) and pred_no_target.numel() == 1:
            pred_no_target = pred_no_target.item()
        if not isinstance(pred_no_target, (bool, np.bool_)):
            raise ValueError(f"pred_no_target must be a bool, got {pred_no_target!r}")
        intersection, union, target, _ = _mask_counts(pred_mask, gt_mask)
        if gt_no_target is not None:
            target = not gt_no_target
        self._append(group, sample_id, I=intersection, U=union, target=target, pred_no_target=bool(pred_no_target))

    def _scored(self, rows: dict[str, list]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Counted I, counted U and the gIoU score of every row, each of shape (N,)."""
        intersections, unions, _ = self._counts(rows)
        is_target = np.asarray(rows["target"], dtype=bool)
        said_no_target = np.asarray(rows["pred_no_target"], dtype=bool)
        counted_i = np.where(said_no_target, 0, intersections)  # a no-target GT has I = 0 anyway
        counted_u = np.where(~is_target & said_no_target, 0, unions)
        scores = np.where(is_target, _per_sample_iou(counted_i, counted_u), said_no_target.astype(np.float64))
        return counted_i, counted_u, scores

    def _summarize(self, rows: dict[str, list]) -> dict[str, float | int]:
        counted_i, counted_u, scores = self._scored(rows)
        is_target = np.asarray(rows["target"], dtype=bool)
        said_no_target = np.asarray(rows["pred_no_target"], dtype=bool)
        n_target = int(is_target.sum())
        n_no_target = len(is_target) - n_target
        summary: dict[str, float | int] = {
            "n_samples": len(is_target),
            "n_target": n_target,
            "n_no_target": n_no_target,
            "gIoU": float(scores.mean()),
            "cIoU": _ratio(counted_i.sum(), counted_u.sum()),
        }
        if n_no_target:
            summary["N-acc"] = float(said_no_target[~is_target].mean())
        if n_target:
            summary["T-acc"] = float((~said_no_target[is_target]).mean())
            summary.update(_precision_at(scores[is_target], PRECISION_THRESHOLDS, PRECISION_KEYS))
        return summary

    def _derived(self, rows: dict[str, list]) -> dict[str, list]:
        """The mask IoU as drawn, and the sample's gIoU score (0 for a target called "no target")."""
        return {"IoU": self._counts(rows)[2].tolist(), "score": self._scored(rows)[2].tolist()}


class SSPSAMReleaseMetrics(_PerSampleMetrics):
    """The released SSP-SAM evaluator's arithmetic (its engine.py and metric/mask_op.py), quirks included.

    Its paper's RES and GRES tables come from it; feed it masks in the release's frame (the
    ``ssp_sam_release`` protocol). One arithmetic for RES and GRES; per sample:

    - GT with a target: I, U and IoU = I / U of the masks as given (a small prediction is not
      read as "no target" here).
    - empty GT: a prediction with fewer than ``empty_threshold`` pixels scores IoU 1 with
      I = U = 0; a larger one scores 0 with I = 0, U = |pred|.

    Reported under keys ending in " (SSP-SAM release)" (``RELEASE_RES_KEYS``, ``RELEASE_GRES_KEYS``):
    the mean IoU ("mIoU" for ``task="res"``, "gIoU" for "gres"), sum I / sum U ("oIoU" / "cIoU")
    and Pr@X for X in 0.5:0.05:0.9 over *all* samples (IoU >= X, no-target ones at 1 or 0). For
    GRES also the release's "N-acc" = samples with IoU == 1 (perfect targets included) / no-target
    samples, and "T-acc" = samples with 0 < IoU < 1 / target samples, each left out when its
    denominator is 0 (the release prints them only when some GT is empty).
    """

    _extra_columns = ("target", "pred_area")

    def __init__(self, task: str, empty_threshold: int = 50) -> None:
        if task not in ("res", "gres"):
            raise ValueError(f"task must be 'res' or 'gres', got {task!r}")
        if isinstance(empty_threshold, bool) or not isinstance(empty_threshold, int) or empty_threshold < 1:
            raise ValueError(f"empty_threshold must be a positive int (pixels), got {empty_threshold!r}")
        super().__init__()
        self.task = task
        self.empty_threshold = empty_threshold

    def _config(self) -> dict[str, Any]:
        return {"task": self.task, "empty_threshold": self.empty_threshold}

    def update(self, pred_mask: Mask, gt_mask: Mask, group: str | None = None, sample_id: str | int | None = None) -> None:
        intersection, union, target, pred_area = _mask_counts(pred_mask, gt_mask)
        self._append(group, sample_id, I=intersection, U=union, target=target, pred_area=pred_area)

    def _scored(self, rows: dict[str, list]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The release's I, U and IoU of every row, each of shape (N,)."""
        intersections, unions, ious = self._counts(rows)
        is_target = np.asarray(rows["target"], dtype=bool)
        small = np.asarray(rows["pred_area"], dtype=np.int64) < self.empty_threshold
        counted_u = np.where(~is_target & small, 0, unions)
        scores = np.where(is_target, ious, small.astype(np.float64))
        return intersections, counted_u, scores

    def _summarize(self, rows: dict[str, list]) -> dict[str, float | int]:
        intersections, unions, ious = self._scored(rows)
        mean_key, overall_key = ("gIoU", "cIoU") if self.task == "gres" else ("mIoU", "oIoU")
        summary: dict[str, float | int] = {
            f"{mean_key}{RELEASE_SUFFIX}": float(ious.mean()),
            f"{overall_key}{RELEASE_SUFFIX}": _ratio(intersections.sum(), unions.sum()),
        }
        if self.task == "gres":
            is_target = np.asarray(rows["target"], dtype=bool)
            n_target = int(is_target.sum())
            if n_target < len(is_target):
                summary[f"N-acc{RELEASE_SUFFIX}"] = float((ious == 1).sum() / (len(is_target) - n_target))
            if n_target:
                summary[f"T-acc{RELEASE_SUFFIX}"] = float(((ious > 0) & (ious < 1)).sum() / n_target)
        summary.update(_precision_at(ious, RELEASE_PRECISION_THRESHOLDS, RELEASE_PRECISION_KEYS))
        return summary

    def _derived(self, rows: dict[str, list]) -> dict[str, list]:
        return {f"IoU{RELEASE_SUFFIX}": self._scored(rows)[2].tolist()}


def _format_cell(key: str, value: float | int | None) -> str:
    if value is None:
        return "-"
    if key.startswith("n_"):
        return str(int(value))
    return f"{100.0 * value:.2f}"


def format_table(metrics: Mapping[str, float], keys: Sequence[str] | None = None) -> str:
    """A two-row fixed-width text table for the console: metric names over values.

    Rates are printed x100 with two decimals, as papers print them; counts (keys starting with
    "n_") as integers; a key missing from ``metrics`` as "-". ``keys`` picks and orders the
    columns (e.g. ``RES_KEYS``); by default every key of ``metrics`` in its order.
    """
    keys = list(metrics) if keys is None else list(keys)
    cells = [_format_cell(key, metrics.get(key)) for key in keys]
    widths = [max(len(key), len(cell)) for key, cell in zip(keys, cells)]
    header = "  ".join(key.rjust(width) for key, width in zip(keys, widths))
    rule = "  ".join("-" * width for width in widths)
    values = "  ".join(cell.rjust(width) for cell, width in zip(cells, widths))
    return "\n".join((header, rule, values))


def format_rows(rows: Mapping[str, Mapping[str, float]], keys: Sequence[str], label_title: str = "") -> str:
    """A fixed-width text table with one row per entry of ``rows`` (label -> metrics).

    Cells as in :func:`format_table`; the first column holds the labels under ``label_title``.
    """
    labels = [label_title, *rows]
    body = [[_format_cell(key, metrics.get(key)) for key in keys] for metrics in rows.values()]
    widths = [max(len(label) for label in labels)] + [
        max(len(key), *(len(cells[i]) for cells in body)) for i, key in enumerate(keys)
    ]
    lines = ["  ".join([label_title.ljust(widths[0]), *(key.rjust(w) for key, w in zip(keys, widths[1:]))])]
    lines.append("  ".join("-" * width for width in widths))
    for label, cells in zip(rows, body):
        lines.append("  ".join([str(label).ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(cells, widths[1:]))]))
    return "\n".join(lines)
