"""Scores of open-vocabulary semantic segmentation, as metrics.md's OVSS section defines them.

Per dataset, a K x K confusion matrix counts every pixel whose GT is not the ignore label:
``counts[g, p]`` = pixels of GT class g predicted as class p. Per class c, with TP_c = counts[c, c],
GT_c = row sum, PRED_c = column sum: IoU_c = TP_c / (GT_c + PRED_c - TP_c).

- mIoU: mean IoU_c over the classes with GT_c + PRED_c > 0 (a class predicted but absent counts 0),
  as metrics.md and detectron2 0.6 define it. "mIoU (GT classes)": over the classes with GT_c > 0 only,
  as detectron2's ``SemSegEvaluator`` has computed it since 2022-07 (the version CAT-Seg installs from
  git), for comparing with numbers published that way: the two differ where a class is predicted but
  absent from every GT image, which is rare with a dataset's 20-150 classes and common with 459-847.
- fwIoU: sum of IoU_c * GT_c / sum(GT) (classes absent from the GT weigh 0).
- pAcc: sum(TP) / sum(GT). mACC: mean of TP_c / GT_c over the classes with GT_c > 0.
- PAS-20b: predictions of any class at or beyond ``background_from`` (20) count as background
  (label 20) before they are counted; the matrix is 21 x 21.
- A zero-shot split (ShapeWorld-OVSS): "mIoU seen" / "mIoU unseen" average IoU_c over the classes
  of each group that have GT_c + PRED_c > 0, and "hIoU" is their harmonic mean 2 s u / (s + u)
  (0 when both are 0). Classes not listed as unseen are seen (a "background" class among them).

Values are fractions in [0, 1]. A group without any scorable class is left out rather than NaN.

The matrix lives on the device of the predictions, so evaluation adds to it without a host sync;
``all_reduce`` sums it over DDP ranks (every rank must have scored distinct pixels: a sampler that
pads ranks with repeated samples must have its repeats dropped first).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


class ConfusionMatrix:
    """Pixel counts ``counts[gt, prediction]``, int64 (K, K), accumulated on one device.

    Args:
        num_classes: K, the number of label classes (PAS-20b: 21).
        ignore_index: GT value of pixels that are not scored.
        background_from: PAS-20b: predictions >= this index are counted as this index. None: no mapping.
        device: where the counts live (that of the predictions, to avoid copies).
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = -1,
        background_from: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if background_from is not None and background_from != num_classes - 1:
            raise ValueError(f"background_from={background_from} must be the last class ({num_classes - 1})")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.background_from = background_from
        # One extra cell collects the ignored pixels, so the update never needs a boolean index
        # (whose size is data-dependent: a host sync on CUDA).
        self._cells = torch.zeros(num_classes * num_classes + 1, dtype=torch.int64, device=device)

    @property
    def counts(self) -> torch.Tensor:
        """int64 (K, K): rows are GT classes, columns predicted classes."""
        return self._cells[:-1].view(self.num_classes, self.num_classes)

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch.

        Args:
            prediction: integer class indices, any shape (e.g. (B, H, W)), in [0, K) (PAS-20b: any
                index of the vocabulary, >= 0).
            target: integer GT of the same shape, in [0, K) or ``ignore_index``.
        """
        if prediction.shape != target.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
        prediction = prediction.to(device=self._cells.device, dtype=torch.int64)
        target = target.to(device=self._cells.device, dtype=torch.int64)
        if self.background_from is not None:
            prediction = prediction.clamp(max=self.background_from)
        k = self.num_classes
        cells = torch.where(target == self.ignore_index, k * k, target * k + prediction).flatten()
        # index_add_ into fixed cells, not bincount: bincount's length depends on the data's maximum,
        # which costs a device-to-host sync per batch on CUDA. Same counts.
        self._cells.index_add_(0, cells, torch.ones_like(cells))

    def merge(self, other: ConfusionMatrix) -> None:
        """Add another matrix of the same classes (e.g. gathered from another process)."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge a {other.num_classes}-class matrix into a {self.num_classes}-class one")
        self._cells += other._cells.to(self._cells.device)

    def all_reduce(self) -> None:
        """Sum the counts over every DDP rank, in place (a no-op outside torch.distributed)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self._cells)

    def compute(self, unseen: Sequence[int] = ()) -> dict[str, float]:
        """mIoU, fwIoU, pAcc, mACC (and with ``unseen`` class indices: mIoU seen / unseen, hIoU).

        Raises:
            ValueError: no pixel was counted.
        """
        return scores_from_counts(self.counts, unseen)

    def per_class_iou(self) -> list[float]:
        """IoU_c per class; NaN where GT_c + PRED_c = 0 (the class is not scored)."""
        iou, _, _ = _class_iou(self.counts)
        return iou.tolist()


def _class_iou(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(IoU_c with NaN where undefined, TP_c, GT_c), float64 on the CPU."""
    counts = counts.detach().to("cpu", torch.float64)
    tp = counts.diagonal()
    gt = counts.sum(dim=1)
    union = gt + counts.sum(dim=0) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.nan)
    return iou, tp, gt


def scores_from_counts(counts: torch.Tensor, unseen: Sequence[int] = ()) -> dict[str, float]:
    """The metrics of the module docstring from a (K, K) confusion matrix ``counts[gt, prediction]``."""
    iou, tp, gt = _class_iou(counts)
    total = gt.sum()
    if total == 0:
        raise ValueError("no labelled pixel was scored")
    scored = ~torch.isnan(iou)
    present = gt > 0
    scores = {
        "mIoU": float(iou[scored].mean()),
        "mIoU (GT classes)": float(iou[present].mean()),
        "fwIoU": float((iou[present] * gt[present]).sum() / total),
        "pAcc": float(tp.sum() / total),
        "mACC": float((tp[present] / gt[present]).mean()),
    }
    if unseen:
        is_unseen = torch.zeros(len(iou), dtype=torch.bool)
        is_unseen[list(unseen)] = True
        for group, members in (("seen", ~is_unseen), ("unseen", is_unseen)):
            if (members & scored).any():
                scores[f"mIoU {group}"] = float(iou[members & scored].mean())
        if "mIoU seen" in scores and "mIoU unseen" in scores:
            seen, held_out = scores["mIoU seen"], scores["mIoU unseen"]
            scores["hIoU"] = 2 * seen * held_out / (seen + held_out) if seen + held_out > 0 else 0.0
    return scores
