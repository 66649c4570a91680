"""Losses of the OVSS models: CAT-Seg's per-pixel, per-class BCE and the TSPP point-map loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .catseg.cost import gather_classes


def per_class_bce(logits: Tensor, labels: Tensor, ignore_index: int = 255, ignore_pixels: str = "negative") -> Tensor:
    """CAT-Seg's loss: logits upsampled (bilinear) to the labels' size, BCE against the one-hot labels.

    With a one-hot target t, BCE(x, t) = softplus(x) - t x, so the sum over classes at a pixel is
    sum_c softplus(x_c) - x_label: computed so, without a (B, T, H, W) one-hot target (at ShapeWorld's
    48 classes and 256x256 labels that target and its int64 one-hot were 0.3 GB per batch of 8).
    ``F.softplus`` returns x itself above 20, where the exact value is larger by under 2e-9.

    Args:
        logits: (B, T, h, w).
        labels: (B, H, W) class ids, ``ignore_index`` where unlabelled.
        ignore_pixels: "negative": ignored pixels count as negatives of every class and the mean runs
            over all B*T*H*W terms (CAT-Seg's code); "excluded": they do not count.
    """
    logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    valid = labels != ignore_index
    label_logits = logits.gather(1, torch.where(valid, labels, 0).long()[:, None])[:, 0]  # (B, H, W) x_label
    positives = (label_logits * valid).sum()
    if ignore_pixels == "negative":
        return (F.softplus(logits).sum() - positives) / logits.numel()
    negatives = (F.softplus(logits).sum(dim=1) * valid).sum()
    return (negatives - positives) / (valid.sum() * logits.shape[1]).clamp(min=1)


def class_cell_fractions(labels: Tensor, num_classes: int, grid: int, ignore_index: int) -> Tensor:
    """(B, H, W) class ids -> (B, T, grid, grid): each cell's fraction of pixels of each class (ignored pixels
    count in the cell's area, in no class), as average-pooling the one-hot map would give; H, W multiples of grid."""
    batch, height, width = labels.shape
    rows = torch.arange(height, device=labels.device) // (height // grid)
    cols = torch.arange(width, device=labels.device) // (width // grid)
    cells = (rows[:, None] * grid + cols[None, :]).expand(batch, -1, -1)
    valid = labels != ignore_index
    slots = torch.where(valid, labels, 0).long() * grid * grid + cells  # (B, H, W) index of (class, cell)
    counts = torch.zeros(batch, num_classes * grid * grid, device=labels.device)
    counts.scatter_add_(1, slots.flatten(1), valid.flatten(1).float())
    return counts.view(batch, num_classes, grid, grid) / ((height // grid) * (width // grid))


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
    fractions = gather_classes(class_cell_fractions(labels, num_classes, point_logits.shape[-1], ignore_index), selected, dim=1)
    present = (fractions.flatten(2).amax(dim=-1) > 0).float()
    return F.binary_cross_entropy_with_logits(point_logits.float(), fractions) + F.binary_cross_entropy_with_logits(
        presence_logits.float(), present
    )
