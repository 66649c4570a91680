"""A reference SSP-SAM forward pass, written from the spec's math for the parity tests only.

Plain torch functional ops on two state dicts, read by their published key names:

- ``release``: a released SSP-SAM state dict (the release's module names: ``clip_proj.*``,
  ``vl_transformer.*``, ``sam.mask_decoder.*`` ...; ``../shared/specs/ssp-sam.md``);
- ``clip``: a CLIP state dict in OpenAI's key layout (``visual.conv1.weight``, ``transformer.resblocks.*``).

Nothing here is imported from ``ssp_sam`` or ``segment_anything``: CLIP-Surgery, both adapters, the
prompt generator and SAM's mask decoder (two-way transformer, upscaling, hypernetwork) are written
out, so that a shared mistake cannot hide. Batch-first throughout: B expressions, N patches,
E = CLIP embedding width, D = adapter width, C = 256 (prompt and SAM width).

The release's own layers fix the head counts: 8 in VAD's text attention, the prompt generator and
SAM's decoder (internal width C/2 in its token-image attentions); the CLIP head counts are given.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

State = Mapping[str, Tensor]
RELEASE_HEADS = 8
SAM_IMAGE_SIZE = 1024


# ----------------------------------------------------------------------------- small pieces


def linear(state: State, prefix: str, x: Tensor) -> Tensor:
    return F.linear(x, state[prefix + "weight"], state.get(prefix + "bias"))


def layer_norm(state: State, prefix: str, x: Tensor, eps: float = 1e-5) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], state[prefix + "weight"], state[prefix + "bias"], eps)


def mlp(state: State, prefix: str, x: Tensor) -> Tensor:
    """``prefix + 'layers.{i}.'`` Linears with ReLU between them (DETR's and SAM's MLP)."""
    count = sum(1 for key in state if key.startswith(prefix + "layers.") and key.endswith(".weight"))
    for i in range(count):
        x = linear(state, f"{prefix}layers.{i}.", x)
        if i < count - 1:
            x = F.relu(x)
    return x


def attend(q: Tensor, k: Tensor, v: Tensor, heads: int, padding: Optional[Tensor] = None, additive: Optional[Tensor] = None) -> Tensor:
    """softmax(q k^T / sqrt(d) + additive, padding keys at -inf) v per head: (B, Tq, W) -> (B, Tq, W)."""
    batch, length, width = q.shape
    d = width // heads

    def split(x: Tensor) -> Tensor:
        return x.reshape(batch, x.shape[1], heads, d).transpose(1, 2)

    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d)
    if additive is not None:
        scores = scores + additive
    if padding is not None:
        scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(batch, length, width)


def packed_attention(
    state: State, prefix: str, query: Tensor, key: Tensor, value: Tensor, heads: int,
    padding: Optional[Tensor] = None, additive: Optional[Tensor] = None,
) -> Tensor:
    """nn.MultiheadAttention's layout: in_proj_weight rows are q, k, v; then out_proj."""
    width = query.shape[-1]
    weight, bias = state[prefix + "in_proj_weight"], state[prefix + "in_proj_bias"]
    q, k, v = (F.linear(x, weight[i * width : (i + 1) * width], bias[i * width : (i + 1) * width]) for i, x in enumerate((query, key, value)))
    return linear(state, prefix + "out_proj.", attend(q, k, v, heads, padding, additive))


def count_blocks(state: State, prefix: str) -> int:
    return len({key[len(prefix) :].split(".")[0] for key in state if key.startswith(prefix)})


# ----------------------------------------------------------------------------- CLIP (OpenAI layout)


def quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


def clip_mlp(state: State, prefix: str, x: Tensor) -> Tensor:
    return linear(state, prefix + "mlp.c_proj.", quick_gelu(linear(state, prefix + "mlp.c_fc.", x)))


def clip_block(state: State, prefix: str, x: Tensor, heads: int, additive: Optional[Tensor] = None) -> Tensor:
    h = layer_norm(state, prefix + "ln_1.", x)
    x = x + packed_attention(state, prefix + "attn.", h, h, h, heads, additive=additive)
    return x + clip_mlp(state, prefix, layer_norm(state, prefix + "ln_2.", x))


def clip_surgery_image(clip: State, pixels: Tensor, heads: int, surgery_blocks: int) -> Tensor:
    """(B, 3, S, S) -> (B, 1+N, E): the last ``surgery_blocks`` blocks run the dual path.

    Original path: the block as it is. Surgery path: softmax(v v^T / sqrt(d)) v through the same
    out_proj, added to its own stream, no MLP. Both attentions read ln_1 of the original stream.
    Output: surgery-stream patches with the original stream's CLS, then ln_post and the projection.
    """
    conv = clip["visual.conv1.weight"]
    x = F.conv2d(pixels, conv, stride=conv.shape[-1]).flatten(2).transpose(1, 2)
    cls = clip["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = layer_norm(clip, "visual.ln_pre.", torch.cat([cls, x], dim=1) + clip["visual.positional_embedding"])
    prefix = "visual.transformer.resblocks."
    blocks = count_blocks(clip, prefix)
    for i in range(blocks - surgery_blocks):
        x = clip_block(clip, f"{prefix}{i}.", x, heads)
    original, surgery = x, x
    for i in range(blocks - surgery_blocks, blocks):
        p = f"{prefix}{i}."
        h = layer_norm(clip, p + "ln_1.", original)
        width = h.shape[-1]
        weight, bias = clip[p + "attn.in_proj_weight"], clip[p + "attn.in_proj_bias"]
        q, k, v = (F.linear(h, weight[j * width : (j + 1) * width], bias[j * width : (j + 1) * width]) for j in range(3))
        surgery = surgery + linear(clip, p + "attn.out_proj.", attend(v, v, v, heads))
        original = original + linear(clip, p + "attn.out_proj.", attend(q, k, v, heads))
        original = original + clip_mlp(clip, p, layer_norm(clip, p + "ln_2.", original))
    tokens = torch.cat([original[:, :1], surgery[:, 1:]], dim=1)
    return layer_norm(clip, "visual.ln_post.", tokens) @ clip["visual.proj"]


def clip_text(clip: State, tokens: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    """(B, L) ids -> words (B, L, W) = ln_final at every position; sentence (B, E) at the EOT (largest id)."""
    x = clip["token_embedding.weight"][tokens] + clip["positional_embedding"]
    length = tokens.shape[1]
    causal = torch.full((length, length), float("-inf"), dtype=x.dtype).triu(1)
    prefix = "transformer.resblocks."
    for i in range(count_blocks(clip, prefix)):
        x = clip_block(clip, f"{prefix}{i}.", x, heads, additive=causal)
    words = layer_norm(clip, "ln_final.", x)
    sentence = words[torch.arange(tokens.shape[0]), tokens.argmax(dim=-1)] @ clip["text_projection"]
    return words, sentence


# ----------------------------------------------------------------------------- adapters and prompt generator


def gru_direction(state: State, prefix: str, x: Tensor, reverse: bool) -> Tensor:
    """One direction of a 1-layer GRU over (B, L, D) -> (B, L, H); gates in PyTorch's order r, z, n."""
    suffix = "_reverse" if reverse else ""
    w_hh, b_hh = state[f"{prefix}weight_hh_l0{suffix}"], state[f"{prefix}bias_hh_l0{suffix}"]
    inputs = F.linear(x, state[f"{prefix}weight_ih_l0{suffix}"], state[f"{prefix}bias_ih_l0{suffix}"])
    hidden_size = w_hh.shape[1]
    h = x.new_zeros(x.shape[0], hidden_size)
    steps = range(x.shape[1] - 1, -1, -1) if reverse else range(x.shape[1])
    outputs = [None] * x.shape[1]
    for t in steps:
        gi, gh = inputs[:, t].split(hidden_size, -1), F.linear(h, w_hh, b_hh).split(hidden_size, -1)
        r = torch.sigmoid(gi[0] + gh[0])
        z = torch.sigmoid(gi[1] + gh[1])
        n = torch.tanh(gi[2] + r * gh[2])
        h = (1 - z) * n + z * h
        outputs[t] = h
    return torch.stack(outputs, dim=1)


def ssp_prompts(release: State, image_tokens: Tensor, words: Tensor, sentence: Tensor, tokens: Tensor) -> dict[str, Tensor]:
    """Adapters, fusion and prompt generator as the release computes them (spec, VAD/LAD/fusion)."""
    features = image_tokens / image_tokens.norm(dim=1, keepdim=True)  # the release's token-axis norm
    text = sentence / sentence.norm(dim=-1, keepdim=True)
    similarity = (features[:, 1:] * text[:, None]).sum(-1)
    low, high = similarity.min(1, keepdim=True).values, similarity.max(1, keepdim=True).values
    similarity = (similarity - low) / (high - low)
    img_query = mlp(release, "clip_img_proj.", features[:, 1:] * similarity[..., None])

    word_features = linear(release, "clip_proj.", words)
    padding = tokens == 0
    context = torch.cat([gru_direction(release, "text_proj.", word_features, r) for r in (False, True)], dim=-1)
    weights = linear(release, "phrase_attn.fc.", context).squeeze(-1).softmax(-1) * (~padding)
    weights = weights / weights.sum(-1, keepdim=True)
    phrase = (weights[..., None] * word_features).sum(1)

    text_info = packed_attention(release, "img2text_attn.", img_query, word_features, word_features, RELEASE_HEADS, padding)
    e_t = mlp(release, "imgtext_proj.", text_info)
    e_i = mlp(release, "img_proj.", img_query)
    cosine = (F.normalize(e_i, dim=-1) * F.normalize(e_t, dim=-1)).sum(-1, keepdim=True)
    score = release["tf_scale"] * torch.exp(-((1 - cosine) ** 2) / (2 * release["tf_sigma"] ** 2))
    fused = layer_norm(release, "norm_img.", img_query) * score
    multimodal = linear(release, "mlp.", torch.tanh(fused) * torch.tanh(phrase)[:, None])

    batch = multimodal.shape[0]
    learned = torch.cat([release["reg_token.weight"], release["prompt_token.weight"]]).expand(batch, -1, -1)
    x = torch.cat([learned, multimodal], dim=1)
    pos = release["vl_pos_embed.weight"]
    prefix = "vl_transformer.encoder.layers."
    for i in range(count_blocks(release, prefix)):
        p = f"{prefix}{i}."
        x = layer_norm(release, p + "norm1.", x + packed_attention(release, p + "self_attn.", x + pos, x + pos, x, RELEASE_HEADS))
        x = layer_norm(release, p + "norm2.", x + linear(release, p + "linear2.", F.relu(linear(release, p + "linear1.", x))))
    x = layer_norm(release, "norm.", x)
    num_prompts = release["prompt_token.weight"].shape[0]
    return {
        "boxes": torch.sigmoid(mlp(release, "bbox_embed.", x[:, 0])),
        "prompts": x[:, 1 : 1 + num_prompts],
        "similarity": similarity,
    }


# ----------------------------------------------------------------------------- SAM mask decoder


def dense_positional_encoding(gaussian: Tensor, side: int) -> Tensor:
    """SAM's random-Fourier PE of the side x side grid: (C, side, side), x coordinate first."""
    centres = (torch.arange(side, dtype=gaussian.dtype) + 0.5) / side
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    projected = (2 * torch.stack([x, y], dim=-1) - 1) @ gaussian * (2 * math.pi)
    return torch.cat([projected.sin(), projected.cos()], dim=-1).permute(2, 0, 1)


def sam_attention(state: State, prefix: str, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """SAM's Attention: separate q/k/v projections (possibly to a narrower width), heads, out_proj."""
    q, k, v = (linear(state, f"{prefix}{name}_proj.", x) for name, x in zip("qkv", (q, k, v)))
    return linear(state, prefix + "out_proj.", attend(q, k, v, RELEASE_HEADS))


def layer_norm_2d(state: State, prefix: str, x: Tensor, eps: float = 1e-6) -> Tensor:
    mean = x.mean(1, keepdim=True)
    variance = (x - mean).pow(2).mean(1, keepdim=True)
    x = (x - mean) / torch.sqrt(variance + eps)
    return state[prefix + "weight"][:, None, None] * x + state[prefix + "bias"][:, None, None]


def sam_mask_logits(release: State, image_embedding: Tensor, prompts: Tensor) -> Tensor:
    """SAM's mask decoder, single-mask output: (1 or B, C, h, w) and (B, T, C) -> (B, 1, 4h, 4w)."""
    decoder, encoder = "sam.mask_decoder.", "sam.prompt_encoder."
    batch, (channels, height, width) = prompts.shape[0], image_embedding.shape[1:]
    output_tokens = torch.cat([release[decoder + "iou_token.weight"], release[decoder + "mask_tokens.weight"]])
    query_pe = torch.cat([output_tokens.expand(batch, -1, -1), prompts], dim=1)
    src = image_embedding + release[encoder + "no_mask_embed.weight"].reshape(1, channels, 1, 1)
    keys = src.expand(batch, -1, -1, -1).flatten(2).transpose(1, 2)
    pe = dense_positional_encoding(release[encoder + "pe_layer.positional_encoding_gaussian_matrix"], height)
    key_pe = pe.flatten(1).transpose(0, 1).expand(batch, -1, -1)

    queries = query_pe
    transformer = decoder + "transformer."
    for i in range(count_blocks(release, transformer + "layers.")):
        p = f"{transformer}layers.{i}."
        if i == 0:  # the first layer skips the PE and the residual in its self-attention
            queries = sam_attention(release, p + "self_attn.", queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + sam_attention(release, p + "self_attn.", q, q, queries)
        queries = layer_norm(release, p + "norm1.", queries)
        queries = layer_norm(release, p + "norm2.", queries + sam_attention(release, p + "cross_attn_token_to_image.", queries + query_pe, keys + key_pe, keys))
        hidden = linear(release, p + "mlp.lin2.", F.relu(linear(release, p + "mlp.lin1.", queries)))
        queries = layer_norm(release, p + "norm3.", queries + hidden)
        keys = layer_norm(release, p + "norm4.", keys + sam_attention(release, p + "cross_attn_image_to_token.", keys + key_pe, queries + query_pe, queries))
    final = sam_attention(release, transformer + "final_attn_token_to_image.", queries + query_pe, keys + key_pe, keys)
    queries = layer_norm(release, transformer + "norm_final_attn.", queries + final)

    x = keys.transpose(1, 2).reshape(batch, channels, height, width)
    up = decoder + "output_upscaling."
    x = F.conv_transpose2d(x, release[up + "0.weight"], release[up + "0.bias"], stride=2)
    x = F.gelu(layer_norm_2d(release, up + "1.", x))
    x = F.gelu(F.conv_transpose2d(x, release[up + "3.weight"], release[up + "3.bias"], stride=2))
    hyper = mlp(release, decoder + "output_hypernetworks_mlps.0.", queries[:, 1])  # mask token 0
    return (hyper[:, None] @ x.flatten(2)).reshape(batch, 1, *x.shape[-2:])


def padded_frame(low_res: Tensor) -> Tensor:
    """256 -> 1024 (bilinear), crop [:1024, :1024], -> 512 (bilinear), as the release's SAM wrapper."""
    full = F.interpolate(low_res, (SAM_IMAGE_SIZE, SAM_IMAGE_SIZE), mode="bilinear", align_corners=False)
    full = full[..., :SAM_IMAGE_SIZE, :SAM_IMAGE_SIZE]
    return F.interpolate(full, (SAM_IMAGE_SIZE // 2, SAM_IMAGE_SIZE // 2), mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------- the whole model


@torch.no_grad()
def reference_forward(
    release: State, clip: State, pixels: Tensor, tokens: Tensor, sam_embedding: Tensor,
    vision_heads: int, text_heads: int, surgery_blocks: int,
) -> dict[str, Tensor]:
    """SSP-SAM from CLIP pixels, token ids and a SAM image embedding.

    Args:
        pixels: (1 or B, 3, S, S) letterboxed, CLIP-normalised image(s).
        tokens: (B, 77) token ids, zero padded.
        sam_embedding: (1 or B, 256, 64, 64) SAM ViT-H image embedding(s).
    Returns:
        mask_logits (B, 1, 512, 512) in the padded SAM frame, boxes (B, 4) cxcywh in the CLIP
        square, similarity (B, N) VAD's min-max normalised map.
    """
    image_tokens = clip_surgery_image(clip, pixels, vision_heads, surgery_blocks)
    words, sentence = clip_text(clip, tokens, text_heads)
    out = ssp_prompts(release, image_tokens.expand(tokens.shape[0], -1, -1), words, sentence, tokens)
    low_res = sam_mask_logits(release, sam_embedding, out["prompts"])
    return {"mask_logits": padded_frame(low_res), "boxes": out["boxes"], "similarity": out["similarity"]}
