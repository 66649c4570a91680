"""The cost volume (cosine similarity of every patch with every class prompt) and the top-K class selection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def cost_volume(image_features: Tensor, text_features: Tensor) -> Tensor:
    """Cosine similarity of patch and text embeddings.

    Args:
        image_features: (B, C, H, W) dense CLIP features (any scale).
        text_features: (T, P, C) or (B, T, P, C) class embeddings, one per prompt template (any scale).

    Returns:
        (B, P, T, H, W) cosine similarities.
    """
    image = F.normalize(image_features, dim=1)
    text = F.normalize(text_features, dim=-1)
    if text.dim() == 3:
        return torch.einsum("bchw,tpc->bpthw", image, text)
    return torch.einsum("bchw,btpc->bpthw", image, text)


def select_classes(cost: Tensor, max_classes: int) -> Tensor | None:
    """The ``max_classes`` classes of each image with the highest maximum cost (over prompts and pixels).

    Args:
        cost: (B, P, T, H, W).

    Returns:
        (B, K) class indices in increasing order (so the aggregated order follows the class list),
        or None when T <= max_classes (every class is aggregated).
    """
    num_classes = cost.shape[2]
    if num_classes <= max_classes:
        return None
    best = cost.transpose(1, 2).flatten(2).amax(dim=-1)  # (B, T)
    return best.topk(max_classes, dim=-1).indices.sort(dim=-1).values


def gather_classes(values: Tensor, selected: Tensor | None, dim: int) -> Tensor:
    """``values`` restricted to the selected classes along ``dim`` (the batch is dim 0)."""
    if selected is None:
        return values
    shape = [1] * values.dim()
    shape[0], shape[dim] = selected.shape
    index = selected.view(shape).expand(*[values.shape[d] if d != dim else selected.shape[1] for d in range(values.dim())])
    return values.gather(dim, index)


def scatter_classes(logits: Tensor, selected: Tensor | None, num_classes: int, fill: float) -> Tensor:
    """(B, K, H, W) logits of the selected classes -> (B, T, H, W), the other classes at ``fill``."""
    if selected is None:
        return logits
    batch, _, height, width = logits.shape
    out = logits.new_full((batch, num_classes, height, width), fill)
    return out.scatter(1, selected[:, :, None, None].expand(-1, -1, height, width), logits)


class CostEmbedding(nn.Module):
    """7x7 convolution over each class's (P, H, W) cost maps: (B, P, T, H, W) -> (B, C, T, H, W)."""

    def __init__(self, num_prompts: int, hidden_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(num_prompts, hidden_dim, kernel_size=7, padding=3)

    def forward(self, cost: Tensor) -> Tensor:
        batch, prompts, classes, height, width = cost.shape
        per_class = cost.transpose(1, 2).reshape(batch * classes, prompts, height, width)
        embedded = self.conv(per_class)
        return embedded.view(batch, classes, -1, height, width).transpose(1, 2)
