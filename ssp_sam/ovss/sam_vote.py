"""The "hard combination" baseline: CAT-Seg + SAM's automatic masks (dense 32 x 32 grid), each mask
labelled by the majority vote of CAT-Seg's per-pixel argmax inside it.

Trained exactly as CAT-Seg (SAM is not run in training). At inference every pixel inside a mask takes
its mask's class; where masks overlap the smallest mask wins (the most specific region, our choice);
pixels in no mask keep CAT-Seg's probabilities.

The vote is once per image, on CAT-Seg's final prediction for it:

- one forward of the whole image (the input square, no sliding window): ``forward`` runs SAM's grid on
  the same input and ``probabilities`` votes on CAT-Seg's (B, T, S, S) prediction;
- CAT-Seg's sliding window: the crops and the global view are CAT-Seg's alone (:meth:`CATSegSAMVote.catseg_predict`),
  and :meth:`CATSegSAMVote.vote_on_image` then votes on the averaged prediction at the image's size with SAM's
  masks of the whole image. Voting inside each view instead would let the averaging of the views' one-hot
  maps give a pixel a label that no mask's vote gave it.

SAM sees the whole image resized to the model's input square, then to its own side (``SAMProposer.embed``),
in both cases (our choice: the same masks with and without the sliding window; SAM's own generator keeps
the aspect ratio and pads, which the square proposer does not do); its masks are brought to the image's
size as SAM's postprocessing does (bilinear on the logits, then > 0).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from .catseg.model import CATSeg
from .model import OVSSModel, OVSSOutput
from .model_config import OVSSModelConfig
from .resize import resize_image
from .sam_mi.proposals import MASK_THRESHOLD, Proposals, SAMProposer, grid_points
from .sam_mi.smagg import assign_proposals
from .sliding_window import sliding_window_inference


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
        return replace(output, proposals=self._grid_proposals(images, sam_embeddings))

    def probabilities(self, output: OVSSOutput) -> Tensor:
        probabilities = super().probabilities(output)
        if output.proposals is None:
            return probabilities
        return vote_in_masks(probabilities, output.proposals.masks(self.image_size), output.proposals.valid)

    def catseg_predict(self, images: Tensor, text: Tensor) -> Tensor:
        """(B, 3, S, S) -> (B, T, S, S) CAT-Seg's probabilities alone, without SAM (the views of a sliding window,
        whose averaged prediction :meth:`vote_on_image` votes on once)."""
        return super().probabilities(super().forward(images, text))

    def sliding_window_vote(
        self, image: Tensor, text: Tensor, window: int, overlap: float, out_size: int, autocast: Callable[[], AbstractContextManager]
    ) -> tuple[Tensor, Proposals]:
        """CAT-Seg's sliding-window prediction of one (3, H, W) image on 0..255, views by CAT-Seg alone, then one
        vote with SAM's masks of the whole image: (T, H, W) float32 probabilities and SAM's proposals.
        ``autocast()`` opens the precision's region (``Precision.autocast``)."""

        def catseg(views: Tensor) -> Tensor:
            with autocast():
                return self.catseg_predict(views, text).float()

        probabilities = sliding_window_inference(catseg, image, window, overlap, out_size)
        with autocast():
            voted, proposals = self.vote_on_image(image, probabilities)
        return voted.float(), proposals

    def vote_on_image(self, image: Tensor, probabilities: Tensor) -> tuple[Tensor, Proposals]:
        """The vote on CAT-Seg's final prediction of one image, with SAM's grid masks of the whole image.

        Args:
            image: (3, H, W) RGB on 0..255, the whole image.
            probabilities: (T, H, W) CAT-Seg's prediction for it (e.g. its sliding-window inference).

        Returns:
            (T, H, W) probabilities voted as :func:`vote_in_masks` does, and SAM's proposals (1 image).
        """
        size = self.image_size
        proposals = self._grid_proposals(resize_image(image, (size, size))[None])
        if proposals.logits.shape[1] == 0:  # SAM kept no mask: CAT-Seg's prediction stands
            return probabilities, proposals
        height, width = probabilities.shape[-2:]
        logits = F.interpolate(proposals.logits.float(), size=(height, width), mode="bilinear", align_corners=False)
        masks = (logits > MASK_THRESHOLD).float() * proposals.valid[:, :, None, None]
        return vote_in_masks(probabilities[None], masks, proposals.valid)[0], proposals

    def _grid_proposals(self, images: Tensor, sam_embeddings: Tensor | None = None) -> Proposals:
        """SAM's masks of (B, 3, S, S) images from its dense grid of point prompts."""
        embeddings = self.proposer.embed(images) if sam_embeddings is None else sam_embeddings
        points = grid_points(self.config.proposals.grid_side, self.image_size, images.shape[0], images.device)
        valid = torch.ones(points.shape[:2], dtype=torch.bool, device=images.device)
        return self.proposer.propose(embeddings, points, valid, self.image_size)
