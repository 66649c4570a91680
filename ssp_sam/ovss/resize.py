"""The resizes of CAT-Seg's pipeline (detectron2's transforms): images, label maps and class probabilities.

- :func:`shortest_edge_size`: detectron2's ``ResizeShortestEdge`` output shape (training crops, and
  the test-time resize before the sliding window).
- :func:`resize_image` (defined beside SAM's input transforms, ``ssp_sam.backbones.sam_frames``, which
  the OVSS embedding cache shares), :func:`resize_label`: bilinear (antialiased) images, nearest-neighbour labels.
- :func:`resize_probabilities`: the model's square output back to an image's size.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..backbones.sam_frames import resize_image  # noqa: F401 (re-exported: the OVSS pipeline's image resize)


def shortest_edge_size(height: int, width: int, short_side: int, max_size: int) -> tuple[int, int]:
    """detectron2's ``ResizeShortestEdge.get_output_shape``: short side to ``short_side``, long side at most ``max_size``."""
    scale = short_side / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resize_label(label: Tensor, size: tuple[int, int]) -> Tensor:
    """(H, W) int64 -> (h, w) by nearest neighbour (detectron2's label resize)."""
    if tuple(label.shape) == tuple(size):
        return label
    return F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()


def resize_probabilities(probabilities: Tensor, size: tuple[int, int]) -> Tensor:
    """(T, h, w) -> (T, H, W) bilinear (the way back from the model's square input); unchanged at the same size."""
    if tuple(probabilities.shape[-2:]) == tuple(size):
        return probabilities
    return F.interpolate(probabilities[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
