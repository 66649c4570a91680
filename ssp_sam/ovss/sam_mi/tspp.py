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
  Ties (our choice, the paper has none): of equal values within a neighbourhood only the lowest flat
  index (row-major) is a peak, so a flat plateau gives one point; a class's best-peak rank goes to its
  first maximum only; equal priorities are taken in flat-index order.
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
    is_peak = (probability == pooled) & _first_of_equals(probability, pooled, config.nms_kernel) & (probability >= config.min_probability)
    priority = torch.where(is_peak, probability, torch.full_like(probability, -1.0))
    if config.sampler == "class_peaks":  # each class's best peak first: one per class, the lowest flat index among equals
        flat = priority.flatten(2)
        best = flat.argmax(dim=-1, keepdim=True)  # argmax gives the first of equal maxima
        bonus = torch.zeros_like(flat).scatter_(-1, best, (flat.gather(-1, best) >= 0).float())
        priority = priority + bonus.view_as(priority)
    per_cell = priority.amax(dim=1).flatten(1)  # (B, H'W'): one point per cell
    height, width = probability.shape[-2:]
    # a stable sort rather than topk: equal priorities in flat-index order (topk leaves their order unspecified)
    top = per_cell.sort(dim=1, descending=True, stable=True)
    count = min(config.budget, per_cell.shape[1])
    indices, values = top.indices[:, :count], top.values[:, :count]
    rows = torch.div(indices, width, rounding_mode="floor")
    cols = indices % width
    points = torch.stack([(cols + 0.5) * (image_size / width), (rows + 0.5) * (image_size / height)], dim=-1)
    return points, values >= 0


def _first_of_equals(probability: Tensor, pooled: Tensor, kernel: int) -> Tensor:
    """(B, K, H, W) bool: False where the cell's ``kernel`` x ``kernel`` window holds, at a lower flat index (a row
    above, or to the left on the same row), a cell of the same value that is itself a max-pool peak (equal to
    ``pooled``, its window's maximum).

    Max-pool NMS alone keeps every cell of a flat plateau (each equals its window's maximum), so one class
    could spend the whole budget on neighbouring cells; with this, of equal peaks within a window only the
    first (lowest flat index) is kept. An equal value that is not a peak (a larger cell lies in its own window)
    suppresses nothing, so inputs without tied peaks keep exactly their peaks.
    """
    radius = kernel // 2
    height, width = probability.shape[-2:]
    pad = (radius, radius, radius, radius)
    # NaN equals nothing; the padded cells are no peaks
    padded = F.pad(torch.where(probability == pooled, probability, float("nan")), pad, value=float("nan"))
    first = torch.ones_like(probability, dtype=torch.bool)
    for dy in range(-radius, 1):
        for dx in range(-radius, radius + 1 if dy < 0 else 0):
            earlier_peak = padded[..., radius + dy : radius + dy + height, radius + dx : radius + dx + width]
            first &= earlier_peak != probability
    return first
