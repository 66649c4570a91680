"""The "hard combination" baseline: CAT-Seg + SAM's automatic masks (dense 32 x 32 grid), each mask
labelled by the majority vote of CAT-Seg's per-pixel argmax inside it.

Trained exactly as CAT-Seg (SAM is not run in training). At inference every pixel inside a mask takes
its mask's class; where masks overlap the smallest mask wins (the most specific region, our choice);
pixels in no mask keep CAT-Seg's probabilities.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from .catseg.model import CATSeg
from .model import OVSSModel, OVSSOutput
from .model_config import OVSSModelConfig
from .sam_mi.proposals import SAMProposer, grid_points
from .sam_mi.smagg import assign_proposals


def vote_in_masks(probabilities: Tensor, masks: Tensor, valid: Tensor) -> Tensor:
    """Replace the probabilities inside each mask by the one-hot of its majority-vote class.

    Args:
        probabilities: (B, T, H, W).
        masks: (B, M, H, W) binary.
        valid: (B, M) bool.

    Returns:
        (B, T, H, W): one-hot of the covering (smallest) mask's class where a mask covers the pixel,
        the input elsewhere.
    """
    if masks.shape[1] == 0:
        return probabilities
    assignment = assign_proposals(masks, valid, probabilities, "majority_vote")
    area = masks.flatten(2).sum(dim=-1)[:, :, None, None].expand_as(masks)
    covering = (masks > 0) & valid[:, :, None, None]
    smallest = torch.where(covering, area, torch.full_like(area, float("inf"))).min(dim=1)
    covered = torch.isfinite(smallest.values)  # (B, H, W)
    label = assignment.gather(1, smallest.indices.flatten(1)).view_as(covered).clamp(min=0)
    voted = F.one_hot(label, probabilities.shape[1]).permute(0, 3, 1, 2).to(probabilities.dtype)
    return torch.where(covered[:, None], voted, probabilities)


class CATSegSAMVote(OVSSModel):
    """``variant=catseg_sam_vote``: CAT-Seg, then SAM's grid masks voted at inference."""

    def __init__(self, catseg: CATSeg, proposer: SAMProposer, config: OVSSModelConfig) -> None:
        super().__init__(catseg, config)
        self.proposer = proposer

    def forward(self, images: Tensor, text: Tensor, sam_embeddings: Tensor | None = None) -> OVSSOutput:
        output = super().forward(images, text)
        if self.training:
            return output
        embeddings = self.proposer.embed(images) if sam_embeddings is None else sam_embeddings
        points = grid_points(self.config.proposals.grid_side, self.image_size, images.shape[0], images.device)
        valid = torch.ones(points.shape[:2], dtype=torch.bool, device=images.device)
        return replace(output, proposals=self.proposer.propose(embeddings, points, valid, self.image_size))

    def probabilities(self, output: OVSSOutput) -> Tensor:
        probabilities = super().probabilities(output)
        if output.proposals is None:
            return probabilities
        return vote_in_masks(probabilities, output.proposals.masks(self.image_size), output.proposals.valid)
