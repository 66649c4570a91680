"""SSP-SAM's training losses: dice + focal on masks, L1 + GIoU on boxes.

Weights from the released recipe: dice 4, focal 4 (gamma 2, alpha 0.25), L1 5, GIoU 2. Every term
is normalised as the release normalises it: summed over the samples of the (per-process) batch
and divided by their number, the focal loss averaged over the pixels of each mask first (the
release averages over all pixels of the batch, the same number since every mask has S/2 x S/2
pixels). Stage 2 trains on all four terms (:func:`ssp_sam_loss`), the REC pretraining stage on
the two box terms only (:func:`rec_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss


@dataclass(frozen=True)
class LossWeights:
    dice: float = 4.0
    focal: float = 4.0
    l1: float = 5.0
    giou: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0


def dice_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """1 - (2 |p t| + 1) / (|p| + |t| + 1) per mask, summed over the batch.

    Args:
        logits: (B, H, W) or (B, 1, H, W) mask logits.
        targets: same shape, values in {0, 1} (or coverages in [0, 1]: ``model.mask_target=area``).
    Returns:
        scalar: the sum over the B masks (divide by the sample count yourself).
    """
    probs = logits.sigmoid().flatten(1)
    targets = targets.flatten(1)
    numerator = 2 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum()


def focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Sigmoid focal loss averaged over each mask's pixels, summed over the batch (scalar)."""
    per_pixel = sigmoid_focal_loss(logits.flatten(1), targets.flatten(1).to(logits.dtype), alpha=alpha, gamma=gamma)
    return per_pixel.mean(-1).sum()


def box_losses(pred_cxcywh: Tensor, target_cxcywh: Tensor) -> tuple[Tensor, Tensor]:
    """L1 on (cx, cy, w, h) and GIoU loss on the corresponding corners, each summed over the batch.

    Args:
        pred_cxcywh, target_cxcywh: (B, 4) normalised boxes. A no-target sample's target is the
            release's: its (0, 0, 0, 0) box moved by the letterbox offset, (offset_x / S, offset_y / S, 0, 0)
            (``ssp_sam/data/training.py``).
    """
    l1 = (pred_cxcywh - target_cxcywh).abs().sum()
    pred_xyxy = box_convert(pred_cxcywh, "cxcywh", "xyxy")
    target_xyxy = box_convert(target_cxcywh, "cxcywh", "xyxy")
    giou = generalized_box_iou_loss(pred_xyxy.float(), target_xyxy.float(), reduction="sum")
    return l1, giou


def _box_terms(pred_boxes: Tensor, target_boxes: Tensor, weights: LossWeights) -> dict[str, Tensor]:
    """Weighted L1 and GIoU terms, each divided by the batch size B."""
    count = max(pred_boxes.shape[0], 1)
    l1, giou = box_losses(pred_boxes.float(), target_boxes.float())
    return {"l1": weights.l1 * l1 / count, "giou": weights.giou * giou / count}


def rec_loss(pred_boxes: Tensor, target_boxes: Tensor, weights: LossWeights = LossWeights()) -> dict[str, Tensor]:
    """The REC pretraining stage's loss: box terms only.

    Args:
        pred_boxes, target_boxes: (B, 4) normalised cxcywh boxes in the CLIP letterbox square.
    Returns:
        {"loss": l1 + giou, "l1": .., "giou": ..}, each already weighted and divided by B.
    """
    terms = _box_terms(pred_boxes, target_boxes, weights)
    terms["loss"] = terms["l1"] + terms["giou"]
    return terms


def ssp_sam_loss(
    mask_logits: Tensor,
    mask_targets: Tensor,
    pred_boxes: Tensor,
    target_boxes: Tensor,
    weights: LossWeights = LossWeights(),
) -> dict[str, Tensor]:
    """Stage 2's loss: mask terms plus box terms.

    Args:
        mask_logits: (B, 1, S/2, S/2) logits in the padded SAM frame.
        mask_targets: (B, 1, S/2, S/2) or (B, S/2, S/2) GT masks in the same frame.
        pred_boxes, target_boxes: (B, 4) normalised cxcywh boxes in the CLIP letterbox square.
    Returns:
        {"loss": total, "dice": .., "focal": .., "l1": .., "giou": ..}, each already weighted and
        divided by B.
    """
    count = max(pred_boxes.shape[0], 1)
    logits = mask_logits.flatten(1).float()
    targets = mask_targets.flatten(1).float()
    terms = {
        "dice": weights.dice * dice_loss(logits, targets) / count,
        "focal": weights.focal * focal_loss(logits, targets, weights.focal_alpha, weights.focal_gamma) / count,
        **_box_terms(pred_boxes, target_boxes, weights),
    }
    terms["loss"] = sum(terms.values())
    return terms
