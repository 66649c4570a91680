"""Attention of the frozen and trained parts, computed with ``F.scaled_dot_product_attention``.

Two kinds of module run here with their parameters and results unchanged (up to floating-point
rounding), so state dicts and checkpoints are unchanged too:

- ``nn.MultiheadAttention`` (open_clip's blocks, VAD's text attention, the prompt generator), through
  :func:`multi_head_attention`;
- segment_anything's mask-decoder transformer: its two-way ``Attention`` spells attention out as
  ``softmax(q k^T / sqrt(d)) v`` and so materialises (B, heads, 5 + T, h w) scores in both directions
  at every layer, and its image stream is a permuted view of (B, C, h, w) that every add and cast
  walks across; through :class:`FusedTwoWayAttention`, :class:`FusedTwoWayAttentionBlock` and
  :class:`FusedTwoWayTransformer` (:func:`fuse_two_way_attention`);
- segment_anything's image-encoder ``Attention``, which adds decomposed relative positions to
  materialised (B heads, h w, h w) scores (4096 x 4096 per head in ViT-B's global blocks at 1024 px),
  through :class:`FusedImageEncoderAttention` (:func:`fuse_image_encoder_attention`): the relative
  positions are folded into the query and key, so one fused kernel computes the same sum.

Why not call ``nn.MultiheadAttention`` itself: with ``batch_first=True`` it transposes its inputs to
sequence-first and runs its packed in-projection on that transposed view. Under CPU bf16 autocast a
linear layer on a non-contiguous 3-D input is computed as a batched matmul against the weight
expanded over the sequence and *copied* (700 MB per call in CLIP ViT-B's blocks), which made bf16
slower than fp32 (benchmarks/README.md). Here every projection runs on a contiguous batch-first
tensor (:func:`linear_input`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention as ImageEncoderAttention
from segment_anything.modeling.image_encoder import get_rel_pos
from segment_anything.modeling.transformer import Attention as TwoWayAttention
from segment_anything.modeling.transformer import TwoWayAttentionBlock, TwoWayTransformer
from torch import Tensor, nn

from .engine.precision import cpu_has_amx
from .errors import ConfigError


def scaled_dot_product_attention(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0, scale: float | None = None
) -> Tensor:
    """``F.scaled_dot_product_attention``, computed in fp32 where a CPU would differentiate it in bf16.

    PyTorch's CPU flash-attention kernel is slower in bf16 than in fp32 once its backward runs, at
    every shape of these models (forward and backward, 2 cores with AMX: SAM decoder's token-to-image
    attention, (8, 8, 133, 16) queries on 4096 keys, 153 ms in bf16 against 68 ms in fp32; its
    image-to-token attention 111 against 61 ms; the prompt generator's self-attention over 325 tokens
    25 against 15 ms), while its forward alone is as fast or faster in bf16. So when autograd will
    differentiate the attention of bf16 inputs on a CPU, the inputs are cast up (exactly) and the
    result cast back: the same attention, computed more exactly, and SSP-SAM-224's training step
    from the caches 1.88 -> 1.55 s (benchmarks/README.md). Autocast is switched off inside, or it
    would cast the inputs straight back to bf16 (the op is on its bf16 list). Elsewhere (inference,
    fp32, CUDA, whose bf16 kernels are fast) the call is ``F.scaled_dot_product_attention`` unchanged.

    Shapes as ``F.scaled_dot_product_attention``: q (..., Lq, E), k (..., Lk, E), v (..., Lk, Ev).
    """
    differentiated = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if q.dtype != torch.bfloat16 or q.device.type != "cpu" or not differentiated:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    if attn_mask is not None and attn_mask.is_floating_point():
        attn_mask = attn_mask.float()
    with torch.autocast("cpu", enabled=False):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    return out.to(q.dtype)


def in_projection(attention: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v = the module's packed in-projection of query, key, value, each split into heads.

    Args:
        query: (B, Lq, D); key, value: (B, Lk, D), batch first.

    Returns:
        q: (B, H, Lq, D/H); k, v: (B, H, Lk, D/H).
    """
    _check_supported(attention)
    weight, bias = attention.in_proj_weight, attention.in_proj_bias
    if query is key and key is value:
        q, k, v = F.linear(linear_input(query), weight, bias).chunk(3, dim=-1)
    else:
        weights = weight.chunk(3)
        biases = bias.chunk(3) if bias is not None else (None, None, None)
        q = F.linear(linear_input(query), weights[0], biases[0])
        if key is value:
            k, v = F.linear(linear_input(key), torch.cat(weights[1:]), _cat_or_none(biases[1:])).chunk(2, dim=-1)
        else:
            k = F.linear(linear_input(key), weights[1], biases[1])
            v = F.linear(linear_input(value), weights[2], biases[2])
    heads = attention.num_heads
    return _split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads)


def out_projection(attention: nn.MultiheadAttention, per_head: Tensor) -> Tensor:
    """(B, H, L, D/H) attention output -> (B, L, D) through the module's out_proj."""
    batch, heads, length, head_dim = per_head.shape
    return attention.out_proj(per_head.transpose(1, 2).reshape(batch, length, heads * head_dim))


def multi_head_attention(
    attention: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """What ``attention(query, key, value, key_padding_mask, need_weights=False, attn_mask=attn_mask)[0]`` returns.

    Attention dropout (``attention.dropout``) applies in training mode, as in the module.

    Args:
        query: (B, Lq, D); key, value: (B, Lk, D), batch first.
        key_padding_mask: (B, Lk) bool, True at keys to ignore (the module's convention).
        attn_mask: (Lq, Lk) additive float mask, or bool with True where attention is not allowed.

    Returns:
        (B, Lq, D).
    """
    q, k, v = in_projection(attention, query, key, value)
    mask = _additive_mask(key_padding_mask, attn_mask, q.dtype)
    dropout = attention.dropout if attention.training else 0.0
    return out_projection(attention, scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout))


def _additive_mask(key_padding_mask: Tensor | None, attn_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """One additive mask (B or 1, 1, Lq or 1, Lk) from the module's two mask conventions, or None."""
    mask = None
    if attn_mask is not None:
        mask = _as_additive(attn_mask, dtype)
    if key_padding_mask is not None:
        padding = _as_additive(key_padding_mask, dtype)[:, None, None, :]
        mask = padding if mask is None else mask + padding
    return mask


def _as_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def linear_input(x: Tensor) -> Tensor:
    """``x`` contiguous and, inside an autocast region, already in its dtype: one copy at most.

    A linear layer under autocast would cast a float32 input anyway; casting it here together with
    the layout change copies a (B, hw, C) view of the image tokens once instead of twice.
    """
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.dtype == torch.float32:
        return x.to(torch.get_autocast_dtype(device), memory_format=torch.contiguous_format)
    return x.contiguous()


def _split_heads(x: Tensor, heads: int) -> Tensor:
    batch, length, width = x.shape
    return x.reshape(batch, length, heads, width // heads).transpose(1, 2)


def _cat_or_none(biases: tuple[Tensor | None, ...]) -> Tensor | None:
    return None if biases[0] is None else torch.cat(biases)


def _check_supported(attention: nn.MultiheadAttention) -> None:
    if not attention._qkv_same_embed_dim or attention.bias_k is not None or attention.add_zero_attn:
        raise ConfigError(
            "fused attention supports nn.MultiheadAttention with packed in-projection, no bias_k/bias_v and no add_zero_attn"
        )


class FusedTwoWayAttention(TwoWayAttention):
    """segment_anything's mask-decoder ``Attention`` with the scores fused into one kernel.

    Same parameters (q_proj, k_proj, v_proj to ``internal_dim``, out_proj back) and the same
    ``softmax(q k^T / sqrt(c_per_head)) v`` per head as the stock module; inputs go to the projections
    contiguous (the image tokens arrive as a permuted view), cast and laid out in one copy.
    """

    def forward(self, q: Tensor, k: Tensor, v: Tensor, q_of: Tensor | None = None, kv_of: Tensor | None = None) -> Tensor:
        """q: (B, Nq, C); k, v: (B, Nk, C). Returns (B, Nq, C).

        ``q_of`` / ``kv_of``: (B,) indices when q / k and v hold fewer rows than the batch (one per
        image, shared by its prompt sets): batch element b reads row ``q_of[b]``. The rows are
        projected once each and then gathered.
        """
        q = self._separate_heads(_gather(self.q_proj(linear_input(q)), q_of), self.num_heads)
        k = self._separate_heads(_gather(self.k_proj(linear_input(k)), kv_of), self.num_heads)
        v = self._separate_heads(_gather(self.v_proj(linear_input(v)), kv_of), self.num_heads)
        return self.out_proj(self._recombine_heads(scaled_dot_product_attention(q, k, v)))


class FusedTwoWayAttentionBlock(TwoWayAttentionBlock):
    """segment_anything's ``TwoWayAttentionBlock`` with the positioned image tokens added once.

    The stock block adds ``keys + key_pe`` twice (keys of the token-to-image attention, queries of
    the image-to-token attention) though ``keys`` does not change in between: the same values, one
    (B, h w, C) add and cast fewer. With ``image_of`` the image tokens are one row per image (the
    first block, before they depend on the prompts) and everything computed from them alone (that
    add, its cast, three projections) runs once per image. Same parameters, state-dict keys and result.
    """

    def forward(
        self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor, image_of: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """queries, query_pe: (B, T, C); keys: (B, h w, C), or (U, h w, C) with ``image_of`` (B,) the
        row of each batch element; key_pe: (1 or as keys, h w, C). Returns queries (B, T, C), keys (B, h w, C)."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        queries = self.norm1(queries)

        # Read by two projections: cast for them once (inside autocast) rather than in each.
        positioned_keys = linear_input(keys + key_pe)
        attn_out = self.cross_attn_token_to_image(q=queries + query_pe, k=positioned_keys, v=keys, kv_of=image_of)
        queries = self.norm2(queries + attn_out)
        queries = self.norm3(queries + self.mlp(queries))

        attn_out = self.cross_attn_image_to_token(q=positioned_keys, k=queries + query_pe, v=queries, q_of=image_of)
        keys = self.norm4(_gather(keys, image_of) + attn_out)
        return queries, keys


class FusedTwoWayTransformer(TwoWayTransformer):
    """segment_anything's ``TwoWayTransformer`` on contiguous (B, h w, C) image tokens.

    The stock forward turns the (B, C, h, w) image embedding and positional encoding into permuted
    views, so each add and cast of the image stream walks a tensor across its rows: on a CPU those
    elementwise passes over (B, 4096, 256) were the largest items of SSP-SAM's evaluation. Here both
    are laid out once, and an image shared by several prompt sets (``image_of``, or an embedding
    broadcast over the batch) is worked on once until the prompts change its tokens (first block).
    Same parameters, state-dict keys and outputs (queries (B, T, C), keys (B, h w, C)).
    """

    def forward(
        self, image_embedding: Tensor, image_pe: Tensor, point_embedding: Tensor, image_of: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """image_embedding: (B, C, h, w), or (U, C, h, w) with ``image_of`` (B,) the image of each
        prompt set; image_pe: (1 or B, C, h, w), the same for all sets when ``image_of`` is given;
        point_embedding: (B, T, C)."""
        batch = point_embedding.shape[0]
        if image_of is None and _broadcast_batch(image_embedding):  # one image for every set (an expand)
            image_embedding, image_of = image_embedding[:1], torch.zeros(batch, dtype=torch.long, device=image_embedding.device)
        if image_pe.shape[0] > 1 and (image_of is not None or _broadcast_batch(image_pe)):
            if not _broadcast_batch(image_pe):
                raise ValueError("image_of needs one positional encoding for all prompt sets (image_pe of batch 1)")
            image_pe = image_pe[:1]
        keys = image_embedding.flatten(2).transpose(1, 2).contiguous()
        key_pe = image_pe.flatten(2).transpose(1, 2).contiguous()
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries=queries, keys=keys, query_pe=point_embedding, key_pe=key_pe, image_of=image_of)
            image_of = None  # the prompts have reached every set's image tokens
        keys = _gather(keys, image_of)
        attn_out = self.final_attn_token_to_image(q=queries + point_embedding, k=keys + key_pe, v=keys)
        return self.norm_final_attn(queries + attn_out), keys


def _gather(rows: Tensor, index: Tensor | None) -> Tensor:
    """``rows[index]`` (one row per batch element), or ``rows`` when ``index`` is None."""
    return rows if index is None else rows.index_select(0, index)


def _broadcast_batch(x: Tensor) -> bool:
    """Whether ``x`` repeats one element along its batch dimension without copies (an ``expand``)."""
    return x.shape[0] > 1 and x.stride(0) == 0


# segment_anything's mask-decoder classes -> the fused ones that replace them (fuse_two_way_attention).
FUSED_DECODER_CLASSES = {
    TwoWayAttention: FusedTwoWayAttention,
    TwoWayAttentionBlock: FusedTwoWayAttentionBlock,
    TwoWayTransformer: FusedTwoWayTransformer,
}


def fuse_two_way_attention(module: nn.Module) -> nn.Module:
    """Turn segment_anything's mask-decoder transformer inside ``module`` into the fused classes, in place.

    Every stock ``Attention``, ``TwoWayAttentionBlock`` and ``TwoWayTransformer`` becomes
    :class:`FusedTwoWayAttention`, :class:`FusedTwoWayAttentionBlock`, :class:`FusedTwoWayTransformer`.
    Only the class changes (the subclasses add no state), so parameters, hooks and state-dict keys
    stay as they are. Returns ``module``.
    """
    for child in module.modules():
        fused = FUSED_DECODER_CLASSES.get(type(child))
        if fused is not None:
            child.__class__ = fused
    return module


class FusedImageEncoderAttention(ImageEncoderAttention):
    """segment_anything's image-encoder ``Attention`` with its relative positions inside one fused kernel.

    The stock module computes ``softmax(q k^T * scale + rel_h + rel_w) v`` per head, where, for a
    query at (y, x) and a key at (i, j), ``rel_h = q . R_h[y, i]`` and ``rel_w = q . R_w[x, j]``
    (decomposed relative positions, unscaled q), and materialises the scores: 12 heads of 4096 x 4096
    in each global block of ViT-B at 1024 px, several times over for the adds and the softmax. The
    bias is itself a dot product, so it folds into the query and key:

        q' = [q * scale, q . R_h[y, :], q . R_w[x, :]]      (E + H + W values)
        k' = [k, onehot(i), onehot(j)]                     (E + H + W values)

    and ``q' . k' = q . k * scale + rel_h + rel_w`` exactly: one ``scaled_dot_product_attention``
    with scale 1 computes the stock result (fp32: within 1e-6; bf16 closer to fp32 than the stock
    module under autocast, whose scores are rounded to bf16 before the bias is added). The value is
    zero-padded to the query's width (fused kernels need equal widths; a narrower value falls back to
    the unfused path) and the padding dropped again. On an AMX CPU a global block of ViT-B ran 5x
    faster in bf16 (0.16 s against 0.78 s, benchmarks/README.md). Same parameters, state-dict keys
    and input/output shapes: x (B, H, W, dim) -> (B, H, W, dim).

    Where autograd will differentiate it (pretraining the ShapeWorld SAM), the stock computation runs:
    the fused kernel's backward made that fp32 training step 8-16 % slower on a CPU. The encoder is
    frozen everywhere else (embedding caches, evaluation, inference), so the fused path serves those.
    So does it in bf16 on a CPU without AMX: PyTorch's flash kernel runs bf16 at fp32's speed there,
    and the folded query is three times as wide in the global blocks (ViT-B at 1024 px on an AMD EPYC
    with AVX512-BF16: 4.4 s per image fused against 1.9 s stock in bf16, while in fp32 fused 7.2 s
    against 9.6 s stock; :func:`_folded_kernel_pays`).
    """

    def forward(self, x: Tensor) -> Tensor:
        differentiated = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        if differentiated or not _folded_kernel_pays(x):
            return super().forward(x)
        batch, height, width, _ = x.shape
        heads = self.num_heads
        q, k, v = self.qkv(x).reshape(batch, height * width, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        head_dim = q.shape[-1]  # q, k, v: (B, heads, H W, head_dim)
        if not self.use_rel_pos:
            out = F.scaled_dot_product_attention(q, k, v)  # the default scale, head_dim ** -0.5, is the module's
        else:
            q_grid = q.reshape(batch, heads, height, width, head_dim)
            rel_h = torch.einsum("bnyxc,yic->bnyxi", q_grid, get_rel_pos(height, height, self.rel_pos_h).to(q.dtype))
            rel_w = torch.einsum("bnyxc,xjc->bnyxj", q_grid, get_rel_pos(width, width, self.rel_pos_w).to(q.dtype))
            rel_h = rel_h.reshape(batch, heads, height * width, height)
            rel_w = rel_w.reshape(batch, heads, height * width, width)
            key_row = torch.eye(height, dtype=q.dtype, device=q.device).repeat_interleave(width, 0)  # (H W, H)
            key_column = torch.eye(width, dtype=q.dtype, device=q.device).repeat(height, 1)  # (H W, W)
            keys_at = (batch, heads, -1, -1)
            folded = head_dim + height + width
            padding = -folded % 8  # kernels prefer widths in multiples of 8 (zeros change no dot product)
            q = F.pad(torch.cat([q * self.scale, rel_h, rel_w], -1), (0, padding))
            k = F.pad(torch.cat([k, key_row.expand(keys_at), key_column.expand(keys_at)], -1), (0, padding))
            out = F.scaled_dot_product_attention(q, k, F.pad(v, (0, folded + padding - head_dim)), scale=1.0)[..., :head_dim]
        return self.proj(out.transpose(1, 2).reshape(batch, height, width, heads * head_dim))


def _folded_kernel_pays(x: Tensor) -> bool:
    """Whether :class:`FusedImageEncoderAttention`'s one fused kernel beats the stock module for input ``x``.

    It does in fp32, on CUDA and, in bf16 or fp16 (the input's or autocast's), on CPUs with AMX; not in
    those precisions on other CPUs (:func:`ssp_sam.engine.precision.cpu_has_amx`).
    """
    if x.device.type != "cpu":
        return True
    low = (torch.bfloat16, torch.float16)
    if x.dtype not in low and not (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in low):
        return True
    return cpu_has_amx()


def fuse_image_encoder_attention(module: nn.Module) -> nn.Module:
    """Turn every stock image-encoder ``Attention`` inside ``module`` into :class:`FusedImageEncoderAttention`, in place.

    As :func:`fuse_two_way_attention`: only the class changes. Returns ``module``.
    """
    for child in module.modules():
        if type(child) is ImageEncoderAttention:
            child.__class__ = FusedImageEncoderAttention
    return module
