"""CAT-Seg's CLIP: dense patch embeddings, intermediate ViT features for the decoder, q/v fine-tuning.

The open_clip model of :func:`ssp_sam.backbones.clip.build_clip_model` (weights loaded and checked
there) is used with CAT-Seg's dense forward pass (KU-CVLAB/CAT-Seg ``third_party/model_vpt.py``):

- position embeddings resized bicubically to the input's token grid (ViT-B/16 trained at 224 runs at
  384: 14x14 -> 24x24), on every call so they can be trained;
- the last block without attention mixing: each token becomes ``out_proj(v(ln_1(x))) + x_cls`` followed
  by the block's MLP (the value path of every token plus the CLS token's input, as CAT-Seg computes it),
  then ``ln_post`` and the visual projection for every token;
- the outputs of two intermediate blocks (ViT-B: 3 and 7, ViT-L: 7 and 15), taken as the blocks run,
  guide the upsampling decoder.

With ``dense="surgery"`` the patch features come instead from CLIP Surgery's value-value stream over
the last ``surgery_blocks`` blocks (as ``ssp_sam.backbones.clip.CLIPSurgeryBackbone`` computes it:
the patch stream adds each block's softmax(v v^T) v attention, its MLP skipped, while the original
stream runs the blocks as usual and feeds the next block), the way the small ShapeWorld CLIPs are
pretrained; the guidance layers are read from the original stream.

Fine-tuning: every attention's packed in-projection is split into q, k and v weights (PyTorch's
``nn.MultiheadAttention`` computes the same with ``_qkv_same_embed_dim=False``), so q and v can be
trained while k, the biases and everything else stay frozen. The image tower's last block mixes no
attention (in both dense paths), so its q never gets a gradient: it stays frozen (CAT-Seg lists it among the trained weights,
where it never changes), and every trained weight gets a gradient at every step (DDP needs no search
for unused parameters).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import Tensor, nn

from ...attention import scaled_dot_product_attention
from ...errors import ConfigError, ImageError


def split_attention_projections(attention: nn.MultiheadAttention) -> None:
    """Replace ``in_proj_weight`` (3D, D) by ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight`` (D, D) each.

    The forward pass is unchanged (PyTorch's separate-projection path); the packed bias stays.
    """
    if not attention._qkv_same_embed_dim:
        return
    q, k, v = attention.in_proj_weight.detach().chunk(3, dim=0)
    attention.in_proj_weight = None
    attention.q_proj_weight = nn.Parameter(q.clone())
    attention.k_proj_weight = nn.Parameter(k.clone())
    attention.v_proj_weight = nn.Parameter(v.clone())
    attention._qkv_same_embed_dim = False


class CATSegCLIP(nn.Module):
    """A CLIP (open_clip) giving CAT-Seg's dense image features and class text embeddings.

    Args:
        clip: the open_clip CLIP, weights already loaded.
        resolution: side of the square images given to :meth:`encode_image`.
        guidance_layers: the two ViT blocks (0-based) whose outputs guide the decoder.
        finetune_qv: train the q and v projections of every attention of both towers.
        finetune_positions: train both towers' position embeddings.
        dense: "catseg" (CAT-Seg's last block) or "surgery" (CLIP Surgery's value-value stream).
        surgery_blocks: blocks of the value-value stream (``dense="surgery"``).
    """

    def __init__(
        self,
        clip: CLIP,
        resolution: int,
        guidance_layers: Sequence[int],
        finetune_qv: bool = True,
        finetune_positions: bool = True,
        dense: str = "catseg",
        surgery_blocks: int = 2,
    ) -> None:
        super().__init__()
        visual = clip.visual
        if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None:
            raise ConfigError("CAT-Seg needs an open_clip CLIP with a plain ViT image tower")
        blocks = [*visual.transformer.resblocks, *clip.transformer.resblocks]
        if not all(isinstance(block, ResidualAttentionBlock) for block in blocks):
            raise ConfigError("CAT-Seg needs open_clip's default ResidualAttentionBlock blocks")
        depth = len(visual.transformer.resblocks)
        if sorted(set(guidance_layers)) != list(guidance_layers) or not all(0 <= i < depth - 1 for i in guidance_layers):
            raise ConfigError(f"ovss_model.clip.guidance_layers: increasing block indices below {depth - 1}, got {list(guidance_layers)}")
        if dense == "surgery" and not 1 <= surgery_blocks < depth:
            raise ConfigError(f"ovss_model.clip.surgery_blocks: between 1 and {depth - 1} for a {depth}-block ViT, got {surgery_blocks}")
        patch = visual.patch_size[0]
        if resolution % patch:
            raise ConfigError(f"ovss_model.clip.resolution: {resolution} is not a multiple of the patch size {patch}")
        self.clip = clip
        self.resolution = resolution
        self.guidance_layers = tuple(guidance_layers)
        self.first_dense_block = depth - (surgery_blocks if dense == "surgery" else 1)
        self.dense = dense
        for block in blocks:
            split_attention_projections(block.attn)
        clip.requires_grad_(False)
        for block in blocks:
            block.attn.q_proj_weight.requires_grad_(finetune_qv)
            block.attn.v_proj_weight.requires_grad_(finetune_qv)
        visual.transformer.resblocks[-1].attn.q_proj_weight.requires_grad_(False)  # never used: see _dense_last_block
        visual.positional_embedding.requires_grad_(finetune_positions)
        clip.positional_embedding.requires_grad_(finetune_positions)

    @property
    def grid_size(self) -> int:
        """Tokens per side of the dense feature map."""
        return self.resolution // self.clip.visual.patch_size[0]

    @property
    def embed_dim(self) -> int:
        """Width of the joint image-text space (cost volume channels)."""
        return self.clip.visual.proj.shape[1]

    @property
    def vision_width(self) -> int:
        """Width of the ViT's residual stream (the intermediate guidance features)."""
        return self.clip.visual.conv1.out_channels

    def positions(self) -> Tensor:
        """Visual position embeddings (1 + g^2, width), the patch part resized bicubically to this grid."""
        table = self.clip.visual.positional_embedding
        trained_side = round((table.shape[0] - 1) ** 0.5)
        if trained_side == self.grid_size:
            return table
        patches = table[1:].reshape(1, trained_side, trained_side, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=(self.grid_size, self.grid_size), mode="bicubic", align_corners=False)
        return torch.cat([table[:1], patches.flatten(2)[0].T], dim=0)

    def encode_image(self, pixels: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Dense CLIP features.

        Args:
            pixels: (B, 3, R, R) normalised with CLIP's mean / std, R = ``resolution``.

        Returns:
            dense: (B, embed_dim, g, g) projected patch embeddings (not normalised), g = R / patch.
            intermediate: per guidance layer, that block's output patch tokens (B, width, g, g).
        """
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, self.resolution, self.resolution):
            raise ImageError(f"CLIP input must have shape (B, 3, {self.resolution}, {self.resolution}), got {tuple(pixels.shape)}")
        visual = self.clip.visual
        x = visual.conv1(pixels.to(visual.conv1.weight.dtype)).flatten(2).transpose(1, 2)
        cls_token = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls_token, x], dim=1) + self.positions().to(x.dtype)
        x = visual.ln_pre(visual.patch_dropout(x))

        sequence_first = not visual.transformer.batch_first
        blocks = visual.transformer.resblocks
        intermediate = []
        for index, block in enumerate(blocks[: self.first_dense_block]):
            x = block(x.transpose(0, 1)).transpose(0, 1) if sequence_first else block(x)
            if index in self.guidance_layers:
                intermediate.append(self._to_map(x[:, 1:]))
        if self.dense == "surgery":
            x = self._surgery_blocks(blocks, x, intermediate)
        else:
            x = self._dense_last_block(blocks[-1], x)
        x = visual.ln_post(x) @ visual.proj
        return self._to_map(x[:, 1:]), intermediate

    def _surgery_blocks(self, blocks: nn.ModuleList, x: Tensor, intermediate: list[Tensor]) -> Tensor:
        """CLIP Surgery's dual streams from block ``first_dense_block`` on: (B, 1 + N, width) -> the value-value stream.

        The original stream's output of the last block is never read, so that block computes only v-v
        attention (its q and MLP unused, as in CAT-Seg's path). Guidance maps come from the original stream.
        """
        original = surgery = x
        for index in range(self.first_dense_block, len(blocks)):
            block = blocks[index]
            normed = block.ln_1(original)
            last = index == len(blocks) - 1
            standard, value_value = self._split_attention(block.attn, normed, standard=not last)
            surgery = surgery + block.ls_1(value_value)
            if last:
                break
            original = original + block.ls_1(standard)
            original = original + block.ls_2(block.mlp(block.ln_2(original)))
            if index in self.guidance_layers:
                intermediate.append(self._to_map(original[:, 1:]))
        return surgery

    @staticmethod
    def _split_attention(attention: nn.MultiheadAttention, x: Tensor, standard: bool) -> tuple[Tensor | None, Tensor]:
        """softmax(q k^T d^-0.5) v (when ``standard``) and softmax(v v^T d^-0.5) v per head through out_proj,
        from the split q/k/v weights: x (B, L, width) -> two (B, L, width)."""
        heads, width = attention.num_heads, x.shape[-1]
        biases = attention.in_proj_bias.chunk(3) if attention.in_proj_bias is not None else (None, None, None)

        def project(weight: Tensor, bias: Tensor | None) -> Tensor:
            return F.linear(x, weight, bias).unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, heads, L, d)

        def out(per_head: Tensor) -> Tensor:
            return attention.out_proj(per_head.transpose(1, 2).reshape(x.shape[0], x.shape[1], width))

        v = project(attention.v_proj_weight, biases[2])
        value_value = out(scaled_dot_product_attention(v, v, v))
        if not standard:
            return None, value_value
        q, k = project(attention.q_proj_weight, biases[0]), project(attention.k_proj_weight, biases[1])
        return out(scaled_dot_product_attention(q, k, v)), value_value

    @staticmethod
    def _dense_last_block(block: ResidualAttentionBlock, x: Tensor) -> Tensor:
        """CAT-Seg's last block: (B, 1 + N, width) -> out_proj(v(ln_1 x)) + x_cls, then + MLP(ln_2 .)."""
        attention = block.attn
        width = x.shape[-1]
        v_bias = attention.in_proj_bias[2 * width:] if attention.in_proj_bias is not None else None
        values = attention.out_proj(F.linear(block.ln_1(x), attention.v_proj_weight, v_bias))
        y = block.ls_1(values) + x[:, :1]
        return y + block.ls_2(block.mlp(block.ln_2(y)))

    def _to_map(self, tokens: Tensor) -> Tensor:
        """(B, g*g, C) row-major tokens -> (B, C, g, g)."""
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], self.grid_size, self.grid_size)

    def encode_text(self, tokens: Tensor) -> Tensor:
        """(N, context_length) token ids -> (N, embed_dim) L2-normalised text embeddings (CLIP's EOT projection)."""
        return F.normalize(self.clip.encode_text(tokens), dim=-1)
