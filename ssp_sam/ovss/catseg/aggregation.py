"""CAT-Seg's cost aggregation: spatial aggregation (Swin blocks per class) and class aggregation (linear
attention across classes), each guided (appearance: CLIP image features; text: class embeddings).

Spatial aggregation uses timm's ``SwinTransformerBlock`` and ``WindowAttention``. CAT-Seg concatenates
the guidance to the inputs of the query and key projections only (the value sees the cost embedding
alone). timm's block cannot take a second input: its ``_attn`` partitions one tensor into windows and
reshapes the attention output with that tensor's channel count, so concatenating the guidance before
it gives the wrong width. So :class:`GuidedSwinBlock` keeps timm's block (norms, MLP, shift masks,
window partition functions) and overrides only ``_attn`` to carry the guidance through the same
shift and partition, and :class:`GuidedQKV` stands in for timm's ``qkv`` linear: a linear map of the
concatenation [x, g] is ``W_x x + W_g g``, so timm's own q/k/v projection of x is kept and a guidance
projection is added to the q and k parts. timm's relative position bias is kept (CAT-Seg's fork of
the Swin block drops it); class aggregation has no positional information at all, so it is
equivariant to permutations of the classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock, window_partition, window_reverse
from torch import Tensor, nn


class GuidedQKV(nn.Module):
    """timm's ``qkv`` linear on windows of [x, guidance]: qkv(x) plus a projection of the guidance into q and k.

    Input (N, L, dim + guidance_dim), output (N, L, 3 * attn_dim) in timm's (q, k, v) layout.
    """

    def __init__(self, qkv: nn.Linear, dim: int, guidance_dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.qkv = qkv
        self.guidance = nn.Linear(guidance_dim, 2 * qkv.out_features // 3, bias=False)

    def forward(self, x_and_guidance: Tensor) -> Tensor:
        x, guidance = x_and_guidance.split([self.dim, x_and_guidance.shape[-1] - self.dim], dim=-1)
        q_k = self.guidance(guidance)
        return self.qkv(x) + F.pad(q_k, (0, q_k.shape[-1] // 2))  # no guidance in v


class GuidedSwinBlock(SwinTransformerBlock):
    """timm's Swin block whose window attention also reads a guidance map in its queries and keys.

    ``forward(x, guidance)``: x (N, H, W, dim), guidance (N, H, W, guidance_dim) -> (N, H, W, dim).
    """

    def __init__(self, dim: int, guidance_dim: int, **swin_kwargs) -> None:
        super().__init__(dim, **swin_kwargs)
        self.attn.qkv = GuidedQKV(self.attn.qkv, dim, guidance_dim)

    def forward(self, x: Tensor, guidance: Tensor) -> Tensor:  # type: ignore[override]
        batch, height, width, channels = x.shape
        x = x + self.drop_path1(self._attn(torch.cat([self.norm1(x), guidance], dim=-1)))
        x = x.reshape(batch, -1, channels)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(batch, height, width, channels)

    def _attn(self, x: Tensor) -> Tensor:
        """timm's ``_attn`` on [x, guidance] (N, H, W, dim + guidance_dim); returns (N, H, W, dim)."""
        _, height, width, _ = x.shape
        shifted = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2)) if any(self.shift_size) else x
        pad_h = (self.window_size[0] - height % self.window_size[0]) % self.window_size[0]
        pad_w = (self.window_size[1] - width % self.window_size[1]) % self.window_size[1]
        shifted = F.pad(shifted, (0, 0, 0, pad_w, 0, pad_h))
        padded_h, padded_w = shifted.shape[1:3]
        windows = window_partition(shifted, self.window_size).view(-1, self.window_area, shifted.shape[-1])
        attended = self.attn(windows, mask=self.attn_mask).view(-1, *self.window_size, self.dim)
        shifted = window_reverse(attended, self.window_size, padded_h, padded_w)[:, :height, :width]
        return torch.roll(shifted, shifts=self.shift_size, dims=(1, 2)) if any(self.shift_size) else shifted


class SpatialAggregation(nn.Module):
    """Two guided Swin blocks (plain and shifted windows) over each class's cost map.

    ``forward(x, guidance)``: x (B, C, T, H, W), guidance (B, G, H, W) -> (B, C, T, H, W).
    """

    def __init__(self, dim: int, guidance_dim: int, resolution: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        common = dict(input_resolution=(resolution, resolution), num_heads=num_heads, window_size=window_size)
        self.blocks = nn.ModuleList([
            GuidedSwinBlock(dim, guidance_dim, shift_size=0, **common),
            GuidedSwinBlock(dim, guidance_dim, shift_size=window_size // 2, **common),
        ])
        self.guidance_norm = nn.LayerNorm(guidance_dim)

    def forward(self, x: Tensor, guidance: Tensor) -> Tensor:
        batch, channels, classes, height, width = x.shape
        tokens = x.permute(0, 2, 3, 4, 1).reshape(batch * classes, height, width, channels)
        guide = self.guidance_norm(guidance.permute(0, 2, 3, 1))
        guide = guide[:, None].expand(-1, classes, -1, -1, -1).reshape(batch * classes, height, width, -1)
        for block in self.blocks:
            tokens = block(tokens, guide)
        return tokens.view(batch, classes, height, width, channels).permute(0, 4, 1, 2, 3)


def linear_attention(queries: Tensor, keys: Tensor, values: Tensor, eps: float = 1e-6) -> Tensor:
    """Linear attention of "Transformers are RNNs" with the elu(x) + 1 feature map.

    Args:
        queries: (N, L, heads, d); keys, values: (N, S, heads, d).

    Returns:
        (N, L, heads, d): sum_s phi(q) . phi(k_s) v_s / sum_s phi(q) . phi(k_s).
    """
    q, k = F.elu(queries) + 1, F.elu(keys) + 1
    length = values.shape[1]
    key_values = torch.einsum("nshd,nshv->nhdv", k, values / length)  # / length: fp16 range, as CAT-Seg
    normaliser = 1 / (torch.einsum("nlhd,nhd->nlh", q, k.sum(dim=1)) + eps)
    return torch.einsum("nlhd,nhdv,nlh->nlhv", q, key_values, normaliser) * length


class ClassAggregation(nn.Module):
    """Linear attention across the classes at every (pooled) position, guided by the class text embeddings.

    The cost embedding is average-pooled (``pooling``; ``test_pooling`` in eval mode) to save compute, attended across classes
    (queries and keys from [x, text guidance], values from x; pre-norm, then a ReLU MLP), upsampled back
    bilinearly and added to the input. With ``pad_to`` the class axis is padded with one learned token
    (and one learned guidance vector) up to ``pad_to`` classes, as CAT-Seg does, so the attention always
    sees the same number of tokens.

    ``forward(x, text_guidance)``: x (B, C, T, H, W), text_guidance (B, T, G) -> (B, C, T, H, W).
    """

    def __init__(
        self, dim: int, guidance_dim: int, num_heads: int, pooling: tuple[int, int], pad_to: int = 0,
        test_pooling: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.pool = nn.AvgPool2d(tuple(pooling))
        self.test_pool = self.pool if test_pooling is None else nn.AvgPool2d(tuple(test_pooling))
        self.norm1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim + guidance_dim, dim)
        self.k = nn.Linear(dim + guidance_dim, dim)
        self.v = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim))
        self.pad_to = pad_to
        if pad_to:
            self.padding_token = nn.Parameter(torch.zeros(dim))
            self.padding_guidance = nn.Parameter(torch.zeros(guidance_dim))

    def forward(self, x: Tensor, text_guidance: Tensor) -> Tensor:
        batch, channels, classes, height, width = x.shape
        pool = self.pool if self.training else self.test_pool
        pooled = pool(x.transpose(1, 2).reshape(batch * classes, channels, height, width))
        pooled_h, pooled_w = pooled.shape[-2:]
        tokens = pooled.view(batch, classes, channels, pooled_h * pooled_w).permute(0, 3, 1, 2)  # (B, HW, T, C)
        guidance = text_guidance[:, None].expand(-1, pooled_h * pooled_w, -1, -1)
        padding = self.pad_to - classes if self.pad_to else 0
        if padding > 0:
            tokens = torch.cat([tokens, self.padding_token.expand(batch, pooled_h * pooled_w, padding, -1)], dim=2)
            guidance = torch.cat([guidance, self.padding_guidance.expand(batch, pooled_h * pooled_w, padding, -1)], dim=2)
        tokens = tokens.flatten(0, 1)  # (B HW, T', C)
        guidance = guidance.flatten(0, 1)

        normed = self.norm1(tokens)
        with_guidance = torch.cat([normed, guidance], dim=-1)
        queries, keys, values = (
            projection.unflatten(-1, (self.num_heads, -1))
            for projection in (self.q(with_guidance), self.k(with_guidance), self.v(normed))
        )
        attended = linear_attention(queries, keys, values)
        tokens = tokens + attended.flatten(-2)
        tokens = tokens + self.mlp(self.norm2(tokens))

        tokens = tokens[:, :classes].reshape(batch, pooled_h, pooled_w, classes, channels)
        maps = tokens.permute(0, 3, 4, 1, 2).reshape(batch * classes, channels, pooled_h, pooled_w)
        maps = F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=True)
        return x + maps.view(batch, classes, channels, height, width).transpose(1, 2)


class AggregationLayer(nn.Module):
    """Spatial then class aggregation: (B, C, T, H, W) -> (B, C, T, H, W)."""

    def __init__(
        self,
        dim: int,
        appearance_dim: int,
        text_dim: int,
        resolution: int,
        num_heads: int,
        window_size: int,
        pooling: tuple[int, int],
        pad_to: int,
        test_pooling: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.spatial = SpatialAggregation(dim, appearance_dim, resolution, num_heads, window_size)
        self.classes = ClassAggregation(dim, text_dim, num_heads, pooling, pad_to, test_pooling)

    def forward(self, x: Tensor, appearance_guidance: Tensor, text_guidance: Tensor) -> Tensor:
        return self.classes(self.spatial(x, appearance_guidance), text_guidance)
