"""Fusion and the SSP prompt generator: from multimodal tokens to SAM prompts and a REC box.

The generator runs a DETR-style transformer over ``[reg_token; prompt_tokens; multimodal]``.
Token 0 (the regression token) feeds the auxiliary REC box head; the next T tokens become the
sparse prompt embeddings of SAM's mask decoder. Shapes: B = batch, N = CLIP patches,
T = prompt tokens (128), C = prompt width (SAM's 256).
"""

from __future__ import annotations

import copy

import math
from typing import Literal

import torch
from segment_anything.modeling.mask_decoder import MLP
from torch import Tensor, nn
from torch.nn import functional as F

from .attention import multi_head_attention


class MultimodalFusion(nn.Module):
    """m = Linear(tanh(visual) * tanh(phrase)): one multimodal token per CLIP patch.

    Args of forward:
        visual: (B, N, D) adapted visual features.
        phrase: (B, D) phrase (or sentence) embedding, broadcast over the patches.
    Returns:
        (B, N, C) multimodal tokens.
    """

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, out_dim)

    def forward(self, visual: Tensor, phrase: Tensor) -> Tensor:
        return self.proj(torch.tanh(visual) * torch.tanh(phrase).unsqueeze(1))


class PostNormEncoderLayer(nn.Module):
    """DETR's encoder layer: self-attention with positions added to queries and keys, post-norm."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        """x: (B, S, C) tokens; pos: (1 or B, S, C) positional embedding. Returns (B, S, C)."""
        q = k = x + pos
        x = self.norm1(x + self.dropout(multi_head_attention(self.self_attn, q, k, x)))
        return self.norm2(x + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x))))))


class PostNormDecoderLayer(nn.Module):
    """DETR's decoder layer: query self-attention, cross-attention to the memory, FFN; post-norm."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries: Tensor, query_pos: Tensor, memory: Tensor, memory_pos: Tensor) -> Tensor:
        """queries: (B, Q, C); memory: (B, M, C); positions broadcastable to them. Returns (B, Q, C)."""
        q = k = queries + query_pos
        x = self.norm1(queries + self.dropout(multi_head_attention(self.self_attn, q, k, queries)))
        attended = multi_head_attention(self.cross_attn, x + query_pos, memory + memory_pos, memory)
        x = self.norm2(x + self.dropout(attended))
        return self.norm3(x + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x))))))


def grid_sincos_embedding(num_tokens: int, dim: int) -> Tensor:
    """2-D sine-cosine codes (num_tokens, dim) of a square patch grid in row-major order.

    The first dim/2 channels code the row, the last dim/2 the column, each as sin and cos of the
    index times dim/4 frequencies 10000^(-k / (dim/4)), k = 0 .. dim/4 - 1 (as in MAE): nearby
    patches get similar codes and position is ordered along both axes.
    """
    side = math.isqrt(num_tokens)
    if side * side != num_tokens or dim % 4:
        raise ValueError(f"sincos position codes need a square grid and dim divisible by 4, got {num_tokens} tokens, dim {dim}")
    frequencies = 10000.0 ** (-torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    index = torch.arange(side, dtype=torch.float64)[:, None] * frequencies  # (side, dim/4)
    axis = torch.cat([index.sin(), index.cos()], dim=1)  # (side, dim/2)
    rows = axis[:, None, :].expand(side, side, dim // 2)
    columns = axis[None, :, :].expand(side, side, dim // 2)
    return torch.cat([rows, columns], dim=-1).reshape(num_tokens, dim).float()


class PromptGenerator(nn.Module):
    """Turns multimodal tokens into T sparse prompts for SAM and a REC box.

    ``mode="encoder"`` (the released design) runs 6 encoder layers over the concatenated
    sequence; ``mode="decoder"`` (an ablation) keeps the multimodal tokens as a fixed memory that
    the regression and prompt tokens cross-attend to.

    Positions: the release adds ``pos_embed`` to queries and keys only (DETR), so attention can
    pick a patch by where it is, but what a prompt token takes from it (the values) says nothing
    about where it was. ``positions_in_values=True`` also adds the patch rows of ``pos_embed`` to
    the multimodal tokens themselves, so a prompt token that attends to a patch carries its
    position to SAM (``SSPSAM`` can start those rows as SAM clicks on the patch centres).

    Initialisation as the release: in encoder mode every weight matrix of the transformer layers
    (attention in/out projections, both FFN Linears) is drawn xavier-uniform, as DETR's
    ``VisionLanguageEncoder._reset_parameters`` does for its parameters with more than one
    dimension; biases and LayerNorms keep PyTorch's defaults. The release's decoder ablation
    (``nn.TransformerDecoder``) keeps PyTorch's defaults, and so does ``mode="decoder"``.
    """

    def __init__(
        self,
        dim: int = 256,
        num_prompt_tokens: int = 128,
        num_visual_tokens: int = 196,
        depth: int = 6,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        dropout: float = 0.0,
        mode: Literal["encoder", "decoder"] = "encoder",
        position_init: Literal["random", "sincos"] = "random",
        positions_in_values: bool = False,
    ) -> None:
        super().__init__()
        if mode not in ("encoder", "decoder"):
            raise ValueError(f"prompt generator mode must be 'encoder' or 'decoder', got {mode!r}")
        self.mode = mode
        self.num_prompt_tokens = num_prompt_tokens
        self.positions_in_values = positions_in_values
        self.reg_token = nn.Embedding(1, dim)
        self.prompt_tokens = nn.Embedding(num_prompt_tokens, dim)
        self.pos_embed = nn.Embedding(1 + num_prompt_tokens + num_visual_tokens, dim)
        if position_init == "sincos":
            self.init_patch_positions(grid_sincos_embedding(num_visual_tokens, dim))
        elif position_init != "random":
            raise ValueError(f"position_init must be 'random' or 'sincos', got {position_init!r}")
        # Copies of one layer, as the release's DETR-style _get_clones makes them: their matrices are drawn
        # again below (encoder mode, as the release), their biases start equal in every layer.
        layer = (PostNormEncoderLayer if mode == "encoder" else PostNormDecoderLayer)(dim, num_heads, ffn_dim, dropout)
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(depth))
        if mode == "encoder":
            for parameter in self.layers.parameters():
                if parameter.dim() > 1:
                    nn.init.xavier_uniform_(parameter)
        self.norm = nn.LayerNorm(dim)
        self.box_head = MLP(dim, dim, 4, 3)

    @torch.no_grad()
    def init_patch_positions(self, codes: Tensor) -> None:
        """Start the position embeddings of the N patch tokens from ``codes`` (N, C)."""
        rows = self.pos_embed.weight[1 + self.num_prompt_tokens :]
        if codes.shape != rows.shape:
            raise ValueError(f"patch position codes: expected {tuple(rows.shape)}, got {tuple(codes.shape)}")
        rows.copy_(codes)

    def forward(self, multimodal: Tensor) -> tuple[Tensor, Tensor]:
        """
        Args:
            multimodal: (B, N, C) fused tokens, one per CLIP patch.
        Returns:
            prompts: (B, T, C) sparse prompt embeddings for SAM's mask decoder.
            boxes: (B, 4) REC box (cx, cy, w, h), normalised to the CLIP letterbox square.
        """
        batch = multimodal.shape[0]
        learned = torch.cat([self.reg_token.weight, self.prompt_tokens.weight]).expand(batch, -1, -1)
        pos = self.pos_embed.weight.unsqueeze(0)
        if self.positions_in_values:
            multimodal = multimodal + pos[:, 1 + self.num_prompt_tokens :]
        if self.mode == "encoder":
            x = torch.cat([learned, multimodal], dim=1)
            for layer in self.layers:
                x = layer(x, pos)
        else:
            num_queries = learned.shape[1]
            x = learned
            for layer in self.layers:
                x = layer(x, pos[:, :num_queries], multimodal, pos[:, num_queries:])
        x = self.norm(x)
        boxes = self.box_head(x[:, 0]).sigmoid()
        return x[:, 1 : 1 + self.num_prompt_tokens], boxes
