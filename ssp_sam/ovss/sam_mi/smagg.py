"""Shallow Mask Aggregation (SMAgg): a one-level tree, every SAM proposal assigned to one class node,
the proposals of a class merged (union) into its class-level mask.

The paper does not give the assignment criterion; ``criterion`` chooses (``SMAggConfig``):

- ``mean_cost`` (default): the class with the highest mean score inside the mask. It uses the whole
  score distribution, so a mask split between two classes goes to the one that fits it better on average.
- ``majority_vote``: the class that is the per-pixel argmax at most of the mask's pixels (the
  "hard combination" rule of the CAT-Seg + SAM baseline, which uses this same function).

Masks may be soft (area fractions at a coarser resolution); both criteria weight pixels by membership.
Ties go to the lowest class index.

The paper's class masks are binary unions: a proposal split between two names enters DMI as surely as
one that clearly shows one. ``confidence="gated"`` (``SMAggConfig``, an ablation switch; default off)
weights each proposal's mask by the confidence of its assignment before the union
(:func:`assign_with_confidence`): with ``mean_cost`` the winner's softmax probability over the classes'
mean costs at ``temperature`` (costs are cosines: 0.01 is CLIP's own logit scale); with
``majority_vote`` the winner's share of the votes.
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
    return _assignment(valid, _per_class(masks, class_scores, criterion))


def assign_with_confidence(
    masks: Tensor, valid: Tensor, class_scores: Tensor, criterion: str, temperature: float
) -> tuple[Tensor, Tensor]:
    """:func:`assign_proposals` and each assignment's confidence in [0, 1].

    Returns:
        (B, M) class index (-1 for padding proposals) and (B, M) confidence: for ``mean_cost`` the
        winner's probability in a softmax over the classes' mean scores divided by ``temperature``, for
        ``majority_vote`` the winner's share of the mask's votes (0 for padding proposals).
    """
    per_class = _per_class(masks, class_scores, criterion)
    if criterion == "mean_cost":
        confidence = torch.softmax(per_class / temperature, dim=-1).amax(dim=-1)
    else:
        confidence = per_class.amax(dim=-1) / per_class.sum(dim=-1).clamp(min=1e-6)
    return _assignment(valid, per_class), torch.where(valid, confidence, torch.zeros_like(confidence))


def _per_class(masks: Tensor, class_scores: Tensor, criterion: str) -> Tensor:
    """(B, M, T) fp32: each proposal's mean score per class (``mean_cost``) or its votes (``majority_vote``)."""
    if criterion not in ("mean_cost", "majority_vote"):
        raise ValueError(f"unknown SMAgg criterion {criterion!r}")
    with torch.autocast(masks.device.type, enabled=False):
        masks = masks.float()
        if criterion == "mean_cost":
            area = masks.flatten(2).sum(dim=-1).clamp(min=1e-6)
            return torch.einsum("bmhw,bthw->bmt", masks, class_scores.float()) / area[..., None]
        winners = F.one_hot(class_scores.argmax(dim=1), class_scores.shape[1]).float()  # (B, H, W, T)
        return torch.einsum("bmhw,bhwt->bmt", masks, winners)


def _assignment(valid: Tensor, per_class: Tensor) -> Tensor:
    return torch.where(valid, per_class.argmax(dim=-1), torch.full_like(valid, -1, dtype=torch.long))


def merge_by_class(masks: Tensor, assignment: Tensor, num_classes: int, weights: Tensor | None = None) -> Tensor:
    """Class-level masks: the union (pixel maximum) of the proposals assigned to each class.

    Args:
        masks: (B, M, H, W) in [0, 1].
        assignment: (B, M) from :func:`assign_proposals` (-1: ignored).
        weights: optional (B, M) factors of the proposals' masks (the gated confidence), else 1.

    Returns:
        (B, T, H, W), zero for classes without a proposal.
    """
    batch, _, height, width = masks.shape
    kept = masks * (assignment >= 0)[:, :, None, None]
    if weights is not None:
        kept = kept * weights[:, :, None, None].to(kept.dtype)
    index = assignment.clamp(min=0)[:, :, None].expand(-1, -1, height * width)
    merged = masks.new_zeros(batch, num_classes, height * width)
    return merged.scatter_reduce(1, index, kept.flatten(2), reduce="amax").view(batch, num_classes, height, width)
