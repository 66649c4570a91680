"""Shallow Mask Aggregation (SMAgg): a one-level tree, every SAM proposal assigned to one class node,
the proposals of a class merged (union) into its class-level mask.

The paper does not give the assignment criterion; ``criterion`` chooses (``SMAggConfig``):

- ``mean_cost`` (default): the class with the highest mean score inside the mask. It uses the whole
  score distribution, so a mask split between two classes goes to the one that fits it better on average.
- ``majority_vote``: the class that is the per-pixel argmax at most of the mask's pixels (the
  "hard combination" rule of the CAT-Seg + SAM baseline, which uses this same function).

Masks may be soft (area fractions at a coarser resolution); both criteria weight pixels by membership.
Ties go to the lowest class index.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def assign_proposals(masks: Tensor, valid: Tensor, class_scores: Tensor, criterion: str) -> Tensor:
    """The class node of each proposal.

    Args:
        masks: (B, M, H, W) membership in [0, 1].
        valid: (B, M) bool, real proposals.
        class_scores: (B, T, H, W) per-class scores (costs, logits or probabilities) at the same size.
        criterion: "mean_cost" or "majority_vote".

    Returns:
        (B, M) class index, -1 for padding proposals.

    Sums and votes are taken in fp32 whatever autocast is in force: bf16 keeps 8 significant bits, so a
    vote of 2001 pixels against 2000 would tie and go to the lower class index (fp16 overflows at 65504).
    """
    if criterion not in ("mean_cost", "majority_vote"):
        raise ValueError(f"unknown SMAgg criterion {criterion!r}")
    with torch.autocast(masks.device.type, enabled=False):
        masks = masks.float()
        if criterion == "mean_cost":
            area = masks.flatten(2).sum(dim=-1).clamp(min=1e-6)
            per_class = torch.einsum("bmhw,bthw->bmt", masks, class_scores.float()) / area[..., None]
        else:
            winners = F.one_hot(class_scores.argmax(dim=1), class_scores.shape[1]).float()  # (B, H, W, T)
            per_class = torch.einsum("bmhw,bhwt->bmt", masks, winners)
    return torch.where(valid, per_class.argmax(dim=-1), torch.full_like(valid, -1, dtype=torch.long))


def merge_by_class(masks: Tensor, assignment: Tensor, num_classes: int) -> Tensor:
    """Class-level masks: the union (pixel maximum) of the proposals assigned to each class.

    Args:
        masks: (B, M, H, W) in [0, 1].
        assignment: (B, M) from :func:`assign_proposals` (-1: ignored).

    Returns:
        (B, T, H, W), zero for classes without a proposal.
    """
    batch, _, height, width = masks.shape
    kept = masks * (assignment >= 0)[:, :, None, None]
    index = assignment.clamp(min=0)[:, :, None].expand(-1, -1, height * width)
    merged = masks.new_zeros(batch, num_classes, height * width)
    return merged.scatter_reduce(1, index, kept.flatten(2), reduce="amax").view(batch, num_classes, height, width)
