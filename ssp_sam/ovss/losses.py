"""Losses of the OVSS models: CAT-Seg's per-pixel, per-class BCE and the TSPP point-map loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .catseg.cost import gather_classes


def one_hot_targets(labels: Tensor, num_classes: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    """(B, H, W) class ids -> (B, T, H, W) float one-hot (all zero at ignored pixels) and the (B, H, W) valid mask."""
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    target = F.one_hot(safe, num_classes).permute(0, 3, 1, 2).to(torch.float32)
    return target * valid[:, None], valid


def per_class_bce(logits: Tensor, labels: Tensor, ignore_index: int = 255, ignore_pixels: str = "negative") -> Tensor:
    """CAT-Seg's loss: logits upsampled (bilinear) to the labels' size, BCE against the one-hot labels.

    Args:
        logits: (B, T, h, w).
        labels: (B, H, W) class ids, ``ignore_index`` where unlabelled.
        ignore_pixels: "negative": ignored pixels count as negatives of every class and the mean runs
            over all B*T*H*W terms (CAT-Seg's code); "excluded": they do not count.
    """
    logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    target, valid = one_hot_targets(labels, logits.shape[1], ignore_index)
    if ignore_pixels == "negative":
        return F.binary_cross_entropy_with_logits(logits, target)
    terms = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * valid[:, None]
    return terms.sum() / (valid.sum() * logits.shape[1]).clamp(min=1)


def point_map_loss(
    point_logits: Tensor,
    presence_logits: Tensor,
    labels: Tensor,
    num_classes: int,
    selected: Tensor | None = None,
    ignore_index: int = 255,
) -> Tensor:
    """TSPP's supervision (our choice; the paper gives none): where each class lies and whether it is present.

    Args:
        point_logits: (B, K, g, g) per-class location logits of the aggregated classes.
        presence_logits: (B, K) per-class presence logits.
        labels: (B, H, W) class ids among T (H, W multiples of g).
        num_classes: T.
        selected: (B, K) the aggregated classes' ids, None when K = T.

    Returns:
        BCE of the location logits against each cell's fraction of the class's pixels, plus BCE of the
        presence logits against "the class has a pixel in the image".
    """
    target, _ = one_hot_targets(labels, num_classes, ignore_index)
    target = gather_classes(target, selected, dim=1)
    fractions = F.adaptive_avg_pool2d(target, point_logits.shape[-2:])
    present = target.flatten(2).amax(dim=-1)
    return F.binary_cross_entropy_with_logits(point_logits.float(), fractions) + F.binary_cross_entropy_with_logits(
        presence_logits.float(), present
    )
