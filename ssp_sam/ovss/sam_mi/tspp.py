"""Text-guided Sparse Point Prompter (TSPP): a point probability map from the cost maps, and sparse points.

The paper reports two linear projection heads on the cost maps and ~96% fewer prompts than SAM's
32 x 32 grid; the rest is our choice (switches in ``TSPPConfig``):

- Heads, on the cost embedding before aggregation (B, C, K, g, g): ``where`` (C -> 1 per class and
  cell: where the class lies) and ``presence`` (C -> 1 on each class's spatial maximum: whether the
  class is in the image). Point probability of class k at a cell: sigmoid(presence_k) * sigmoid(where_k).
  Trained by :func:`ssp_sam.ovss.losses.point_map_loss` (cell fractions of each class, class presence).
- Sampling (``sampler``): peaks are cells that are the maximum of their ``nms_kernel`` neighbourhood
  (non-maximum suppression by max pooling) with probability >= ``min_probability``, on the map
  upsampled ``upsample`` times. ``class_peaks`` (default) takes peaks per class and ranks every class's
  best peak above all other peaks, so each likely class gets a point before any class gets a second
  one (rare classes are prompted); ``global_peaks`` takes the peaks of the maximum over classes
  (one ranking for the whole image). Either way at most ``budget`` points, one per cell, at cell centres.
  At inference ``test_budget`` / ``test_min_probability`` replace them where given (``at_inference``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model_config import TSPPConfig


@dataclass
class TSPPLogits:
    where: Tensor  # (B, K, g, g) per-class location logits
    presence: Tensor  # (B, K) per-class presence logits

    def point_map(self) -> Tensor:
        """(B, K, g, g) probability of a good prompt for class k at each cell."""
        return torch.sigmoid(self.presence)[:, :, None, None] * torch.sigmoid(self.where)


class TSPPHeads(nn.Module):
    """The two linear heads: (B, C, K, g, g) cost embedding -> :class:`TSPPLogits`."""

    def __init__(self, hidden_dim: int) -> None:
        super().__init__()
        self.where = nn.Linear(hidden_dim, 1)
        self.presence = nn.Linear(hidden_dim, 1)

    def forward(self, embedding: Tensor) -> TSPPLogits:
        channels_last = embedding.permute(0, 2, 3, 4, 1)  # (B, K, g, g, C)
        where = self.where(channels_last)[..., 0]
        presence = self.presence(channels_last.flatten(2, 3).amax(dim=2))[..., 0]
        return TSPPLogits(where=where, presence=presence)


@torch.no_grad()
def sample_points(point_map: Tensor, image_size: int, config: TSPPConfig) -> tuple[Tensor, Tensor]:
    """Sparse point prompts from a point probability map.

    Args:
        point_map: (B, K, g, g) probabilities.
        image_size: S, the input side (points are returned in its pixels).

    Returns:
        points: (B, N, 2) (x, y) at cell centres in [0, S), N = min(budget, cells of the upsampled map).
        valid: (B, N) bool, False for slots without a peak (fewer peaks than the budget).
    """
    probability = point_map.float()
    if config.upsample > 1:
        probability = F.interpolate(probability, scale_factor=config.upsample, mode="bilinear", align_corners=False)
    if config.sampler == "global_peaks":
        probability = probability.amax(dim=1, keepdim=True)
    pooled = F.max_pool2d(probability, config.nms_kernel, stride=1, padding=config.nms_kernel // 2)
    is_peak = (probability == pooled) & (probability >= config.min_probability)
    priority = torch.where(is_peak, probability, torch.full_like(probability, -1.0))
    if config.sampler == "class_peaks":
        best = priority.flatten(2).amax(dim=-1)[:, :, None, None]
        priority = priority + ((priority == best) & (priority >= 0)).float()  # each class's best peak first
    per_cell = priority.amax(dim=1).flatten(1)  # (B, H'W'): one point per cell
    height, width = probability.shape[-2:]
    top = per_cell.topk(min(config.budget, per_cell.shape[1]), dim=1)
    rows = torch.div(top.indices, width, rounding_mode="floor")
    cols = top.indices % width
    points = torch.stack([(cols + 0.5) * (image_size / width), (rows + 0.5) * (image_size / height)], dim=-1)
    return points, top.values >= 0
