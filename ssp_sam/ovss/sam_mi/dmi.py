"""Decoupled Mask Injection (DMI): class-level SAM masks into CAT-Seg's pipeline instead of label voting.

The paper names the parts (low frequency: mask pooling over the final CLIP feature map for intra-mask
context and cross-attention between masks for inter-mask context, into aggregation; high frequency:
high-resolution masks and intermediate features, into upsampling); the internals are our choice
(switches in ``DMIConfig``):

- :class:`LowFrequencyInjection`, before every aggregation layer: each class's mask pools the dense
  CLIP features (intra-mask context), the pooled tokens attend to each other (inter-mask context; no
  positions, so equivariant over classes), and a linear map of the result is added to that class's
  cost embedding inside its mask. The output map starts at zero, so training starts from CAT-Seg.
- :func:`high_frequency_maps`, into each decoder block: the class mask at the block's resolution and
  its edge map |m - blur3x3(m)|; the block's convolution reads them with the CLIP intermediate
  features it is already guided by (extra input channels starting at zero, see ``UpBlock``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HIGH_FREQUENCY_CHANNELS = 2  # mask, edges


class LowFrequencyInjection(nn.Module):
    """``forward(x, dense, masks, present)``: cost embedding x (B, C, K, g, g), dense CLIP features
    (B, E, g, g), class masks (B, K, g, g) in [0, 1], present (B, K) bool -> x with mask context added."""

    def __init__(self, embed_dim: int, hidden_dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)
        self.between_masks = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
        self.out = nn.Linear(embed_dim, hidden_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, dense: Tensor, masks: Tensor, present: Tensor) -> Tensor:
        area = masks.flatten(2).sum(dim=-1).clamp(min=1e-6)
        pooled = torch.einsum("bkhw,behw->bke", masks, dense) / area[..., None]  # intra-mask context
        tokens = self.norm(pooled)
        # An image without masks attends over all (empty) tokens: nothing is injected there anyway.
        attend_to = present | ~present.any(dim=1, keepdim=True)
        context = tokens + self.between_masks(tokens, tokens, tokens, key_padding_mask=~attend_to, need_weights=False)[0]
        injected = self.out(context).transpose(1, 2)[..., None, None]  # (B, C, K, 1, 1)
        return x + injected * masks[:, None]


def high_frequency_maps(class_masks: Tensor, size: int) -> Tensor:
    """(B, K, Hm, Wm) class masks in [0, 1] -> (B, K, 2, size, size): the mask (area fraction) and its edges."""
    masks = F.adaptive_avg_pool2d(class_masks, (size, size)) if size < class_masks.shape[-1] else (
        F.interpolate(class_masks, size=(size, size), mode="nearest")
    )
    batch, classes = masks.shape[:2]
    flat = masks.flatten(0, 1)[:, None]
    edges = (flat - F.avg_pool2d(flat, 3, stride=1, padding=1, count_include_pad=False)).abs()
    return torch.stack([masks, edges.view(batch, classes, size, size)], dim=2)
