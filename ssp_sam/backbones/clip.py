"""The frozen CLIP side of SSP-SAM: building the model and its CLIP-Surgery forward pass.

SSP-SAM reads a referring expression with CLIP's text tower and the image with CLIP's vision tower in
its "CLIP Surgery" form: the last blocks get a second, value-value attention path whose tokens keep
their own location, giving patch features that line up with the text embedding. No new parameters are
involved, so the open_clip model with OpenAI weights is used as is and only the forward pass changes.

The rest of the CLIP side has its own modules, as in ``segment_anything`` (modeling / weight files /
transforms): weight files in :mod:`ssp_sam.backbones.clip_weights`, the tokenizer in
:mod:`ssp_sam.backbones.clip_tokenizer`, the letterbox into CLIP's square in :mod:`ssp_sam.letterbox`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import open_clip
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import Tensor, nn

from ..attention import in_projection, multi_head_attention, out_projection, scaled_dot_product_attention
from ..errors import ConfigError, ExpressionError, ImageError
from .clip_stem import ConvStem
from .clip_weights import load_clip_weights

OPEN_CLIP_ARCHS = ("ViT-B-16", "ViT-L-14-336")
CUSTOM_ARCH = "custom"

_CUSTOM_REQUIRED = (
    "embed_dim",
    "image_size",
    "patch_size",
    "vision_width",
    "vision_layers",
    "vision_head_width",
    "text_width",
    "text_layers",
    "text_heads",
)
# stem: "patch" (open_clip's single patchify convolution) or "conv" (ConvStem: 3x3 convolutions, clip_stem.py).
_CUSTOM_DEFAULTS = {"context_length": 77, "vocab_size": 49408, "stem": "patch"}
CUSTOM_STEMS = ("patch", "conv")
# The text-tower parameters ``model.finetune_text_encoder`` trains (names in open_clip's CLIP). The token
# embedding stays frozen: the side words' embeddings are already far apart ("left" / "right": cosine
# 0.08 in the ShapeWorld CLIP), and it is most of the tower's size (49,408 rows).
FINETUNED_TEXT_PARAMETERS = ("positional_embedding", "transformer.", "ln_final.", "text_projection")



# ---------------------------------------------------------------------------------------------------
# Model building
# ---------------------------------------------------------------------------------------------------


def build_clip_model(
    arch: str,
    checkpoint: str | os.PathLike | None = None,
    custom: Mapping | None = None,
) -> CLIP:
    """Build a frozen open_clip CLIP (QuickGELU, as OpenAI trained it) and load its weights.

    Args:
        arch: "ViT-B-16", "ViT-L-14-336" (open_clip's configs) or "custom" (built from ``custom``).
        checkpoint: OpenAI's TorchScript ``.pt``, a plain or OpenAI state dict, an open_clip training
            checkpoint ({"state_dict": ...}, "module." prefixes allowed) or a ``.safetensors`` file.
            None keeps the random initialisation (tests, benchmarks).
        custom: for arch "custom": embed_dim, image_size, patch_size, vision_width, vision_layers,
            vision_head_width, text_width, text_layers, text_heads, and optionally context_length (77),
            vocab_size (49408, the BPE tokenizer's vocabulary) and stem ("patch", open_clip's, or
            "conv": :class:`ConvStem` in place of ``visual.conv1``).

    Returns:
        The model in eval mode with ``requires_grad`` False on every parameter.
    """
    if arch in OPEN_CLIP_ARCHS:
        if custom is not None:
            raise ConfigError(f"CLIP arch {arch!r} takes its config from open_clip; 'custom' must be None")
        config = open_clip.get_model_config(arch)
        model = CLIP(**config, quick_gelu=True)
    elif arch == CUSTOM_ARCH:
        config = _custom_config(custom)
        stem = config.pop("stem")
        model = CLIP(**config, quick_gelu=True)
        if stem == "conv":
            vision = config["vision_cfg"]
            model.visual.conv1 = ConvStem(vision.width, vision.patch_size)
    else:
        raise ConfigError(f"unknown CLIP arch {arch!r}; expected one of {(*OPEN_CLIP_ARCHS, CUSTOM_ARCH)}")

    if checkpoint is not None:
        load_clip_weights(model, checkpoint, arch)

    model.eval()
    model.requires_grad_(False)
    return model


def _custom_config(custom: Mapping | None) -> dict:
    """Turn the flat "custom" mapping into open_clip's CLIP keyword arguments, plus "stem"."""
    if custom is None:
        raise ConfigError("CLIP arch 'custom' needs the 'custom' mapping of sizes")
    values = {**_CUSTOM_DEFAULTS, **dict(custom)}
    missing = [key for key in _CUSTOM_REQUIRED if key not in values]
    unknown = sorted(set(values) - set(_CUSTOM_REQUIRED) - set(_CUSTOM_DEFAULTS))
    if missing or unknown:
        raise ConfigError(f"custom CLIP config: missing keys {missing}, unknown keys {unknown}")
    if values["stem"] not in CUSTOM_STEMS:
        raise ConfigError(f"custom CLIP config: stem must be one of {', '.join(CUSTOM_STEMS)}, got {values['stem']!r}")
    divisible = (("vision_width", "vision_head_width"), ("text_width", "text_heads"), ("image_size", "patch_size"))
    for size, divisor in divisible:
        if values[size] % values[divisor]:
            raise ConfigError(
                f"custom CLIP config: {size} {values[size]} is not a multiple of {divisor} {values[divisor]}"
            )
    vision_cfg = CLIPVisionCfg(
        layers=values["vision_layers"],
        width=values["vision_width"],
        head_width=values["vision_head_width"],
        patch_size=values["patch_size"],
        image_size=values["image_size"],
    )
    text_cfg = CLIPTextCfg(
        context_length=values["context_length"],
        vocab_size=values["vocab_size"],
        width=values["text_width"],
        heads=values["text_heads"],
        layers=values["text_layers"],
    )
    return {"embed_dim": values["embed_dim"], "vision_cfg": vision_cfg, "text_cfg": text_cfg, "stem": values["stem"]}


# ---------------------------------------------------------------------------------------------------
# CLIP Surgery
# ---------------------------------------------------------------------------------------------------


class CLIPSurgeryBackbone(nn.Module):
    """A frozen open_clip CLIP whose last ``surgery_blocks`` vision blocks run the CLIP-Surgery dual path.

    In each dual block the original path is the standard block (attention + MLP). The surgery path
    replaces q and k by v in the same attention (softmax(v v^T d^-0.5) v per head, same out_proj),
    adds it residually to its own stream and has no MLP. Both attentions read ln_1 of the original
    stream (which, in the first dual block, is still the single stream), so the surgery stream only
    accumulates and never feeds back. The output is the surgery stream with the CLS token taken from
    the original stream, after ln_post and the visual projection.

    Stays in eval mode with frozen parameters, except the text tower's :data:`FINETUNED_TEXT_PARAMETERS`
    with ``finetune_text=True`` (``model.finetune_text_encoder``), and the last ``finetune_image_blocks``
    vision blocks with ``ln_post`` and the visual projection (``model.finetune_image_blocks``), which
    train: deviations from the release's frozen CLIP (CLIP has no dropout, so eval mode does not
    change the forward). The image forward is then split where training starts: the frozen part
    (:meth:`frozen_image_features`, never differentiated, what ``ImageTokenCache`` stores) and the
    rest (:meth:`finish_image_tokens`).
    """

    def __init__(self, model: CLIP, surgery_blocks: int = 6, finetune_text: bool = False, finetune_image_blocks: int = 0) -> None:
        super().__init__()
        visual = model.visual
        if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None or visual.pool_type != "tok":
            raise ConfigError("CLIPSurgeryBackbone needs an open_clip CLIP with a plain ViT image tower")
        blocks = visual.transformer.resblocks
        if not all(isinstance(block, ResidualAttentionBlock) for block in [*blocks, *model.transformer.resblocks]):
            raise ConfigError("CLIPSurgeryBackbone needs open_clip's default ResidualAttentionBlock in both towers")
        if not 0 <= surgery_blocks <= len(blocks):
            raise ConfigError(f"surgery_blocks={surgery_blocks} must lie in [0, {len(blocks)}] (vision blocks)")
        if finetune_image_blocks != 0 and not surgery_blocks <= finetune_image_blocks <= len(blocks):
            # Fewer than the dual blocks would start training between them, where the frozen part's
            # output would be two streams; the split is kept at a single one.
            raise ConfigError(
                f"model.finetune_image_blocks={finetune_image_blocks}: must be 0 or lie in [surgery_blocks, vision blocks] "
                f"= [{surgery_blocks}, {len(blocks)}]"
            )
        self.clip = model
        self.surgery_blocks = surgery_blocks
        self.finetune_text = finetune_text
        self.finetune_image_blocks = finetune_image_blocks
        self.clip.requires_grad_(False)
        for parameter in [*self.finetuned_text_parameters(), *self.finetuned_image_parameters()]:
            parameter.requires_grad_(True)
        self.train(False)

    def finetuned_text_parameters(self) -> list[nn.Parameter]:
        """The text-tower parameters that train (empty unless ``finetune_text``)."""
        if not self.finetune_text:
            return []
        return [p for name, p in self.clip.named_parameters() if name.startswith(FINETUNED_TEXT_PARAMETERS)]

    def finetuned_image_parameters(self) -> list[nn.Parameter]:
        """The image-tower parameters that train: the last ``finetune_image_blocks`` blocks, ``ln_post``
        and ``proj`` (empty when ``finetune_image_blocks`` is 0)."""
        if not self.finetune_image_blocks:
            return []
        visual = self.clip.visual
        blocks = visual.transformer.resblocks[len(visual.transformer.resblocks) - self.finetune_image_blocks :]
        return [*blocks.parameters(), *visual.ln_post.parameters(), visual.proj]

    def train(self, mode: bool = True) -> CLIPSurgeryBackbone:
        """CLIP is frozen in SSP-SAM (or has no dropout to switch, when its text tower trains): ignore ``mode``
        and stay in eval mode."""
        return super().train(False)

    @property
    def image_size(self) -> int:
        return self.clip.visual.image_size[0]

    @property
    def grid_size(self) -> int:
        """Patches per side of the square image."""
        return self.clip.visual.grid_size[0]

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def embed_dim(self) -> int:
        """Width of the visual and text projections (the joint embedding space)."""
        return self.clip.visual.proj.shape[1]

    @property
    def text_width(self) -> int:
        return self.clip.transformer.width

    @property
    def context_length(self) -> int:
        return self.clip.context_length

    def encode_image(self, pixels: Tensor) -> Tensor:
        """CLIP-Surgery image tokens.

        Args:
            pixels: (B, 3, S, S) images already letterboxed and normalised with CLIP_MEAN / CLIP_STD.

        Returns:
            (B, 1 + N, embed_dim): token 0 is CLIP's usual image embedding (the CLS token of the
            original stream), tokens 1..N the surgery-stream patch tokens in row-major grid order.
            With a graph through the fine-tuned blocks only (``finetune_image_blocks``).
        """
        return self.finish_image_tokens(self.frozen_image_features(pixels))

    def image_tokens(self, pixels: Tensor) -> Tensor:
        """The whole image tower as :meth:`encode_image` computes it, differentiated wherever autograd
        records and the parameters require it: what pretraining (``ssp_sam/pretrain/clip.py``) trains,
        where SSP-SAM's forward keeps the frozen part out of autograd. (B, 3, S, S) -> (B, 1 + N, embed_dim)."""
        return self._tokens_from(self._patch_tokens(pixels), 0)

    @torch.no_grad()
    def frozen_image_features(self, pixels: Tensor) -> Tensor:
        """What the frozen part of the image tower computes: the tokens themselves when the whole tower is
        frozen, else the (B, 1 + N, width) input of the first fine-tuned block. Never differentiated."""
        x = self._patch_tokens(pixels)
        if self.finetune_image_blocks:
            blocks = self.clip.visual.transformer.resblocks
            return self._run_plain_blocks(x, blocks[: len(blocks) - self.finetune_image_blocks])
        return self._tokens_from(x, 0)

    def _patch_tokens(self, pixels: Tensor) -> Tensor:
        """(B, 3, S, S) checked, then the stem, class token and positions: (B, 1 + N, width)."""
        size = self.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ImageError(f"pixels must have shape (B, 3, {size}, {size}), got {tuple(pixels.shape)}")
        return self._embed_patches(pixels.to(self.clip.visual.conv1.weight.dtype))

    def finish_image_tokens(self, features: Tensor) -> Tensor:
        """:meth:`frozen_image_features` -> the (B, 1 + N, embed_dim) tokens: the fine-tuned blocks (with a
        graph when autograd records), or nothing when the whole tower is frozen."""
        if not self.finetune_image_blocks:
            return features
        return self._tokens_from(features, len(self.clip.visual.transformer.resblocks) - self.finetune_image_blocks)

    def _tokens_from(self, x: Tensor, first_block: int) -> Tensor:
        """The tower from block ``first_block`` on (plain blocks, then the dual ones), ln_post and the
        projection: (B, 1 + N, width) -> (B, 1 + N, embed_dim)."""
        visual = self.clip.visual
        blocks = visual.transformer.resblocks
        first_dual = len(blocks) - self.surgery_blocks
        x = self._run_plain_blocks(x, blocks[first_block:first_dual])

        original = x
        surgery = x
        for index, block in enumerate(blocks[first_dual:], start=first_dual):
            # Of the original stream only the CLS token is kept: in the last block its other rows would be
            # computed and dropped (their MLP is ~6 % of the tower), so that block runs the CLS query alone.
            last = index == len(blocks) - 1
            standard_attention, value_attention = self._dual_attention(block, block.ln_1(original), cls_query_only=last)
            surgery = surgery + block.ls_1(value_attention)
            original = (original[:, :1] if last else original) + block.ls_1(standard_attention)
            original = original + block.ls_2(block.mlp(block.ln_2(original)))

        tokens = torch.cat([original[:, :1], surgery[:, 1:]], dim=1)
        return visual.ln_post(tokens) @ visual.proj

    def _embed_patches(self, pixels: Tensor) -> Tensor:
        """Patch embedding, CLS token, positions and ln_pre, as in open_clip: (B, 3, S, S) -> (B, 1+N, width)."""
        visual = self.clip.visual
        x = visual.conv1(pixels).flatten(2).transpose(1, 2)
        cls_token = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls_token, x], dim=1) + visual.positional_embedding.to(x.dtype)
        x = visual.patch_dropout(x)
        return visual.ln_pre(x)

    @staticmethod
    def _run_plain_blocks(x: Tensor, blocks: nn.ModuleList, attn_mask: Tensor | None = None) -> Tensor:
        """open_clip's ResidualAttentionBlock forward, batch first, with fused attention (ssp_sam/attention.py).

        Args:
            x: (B, T, width); attn_mask: (T, T) additive (the text tower's causal mask) or None.
        """
        for block in blocks:
            normed = block.ln_1(x)
            x = x + block.ls_1(multi_head_attention(block.attn, normed, normed, normed, attn_mask=attn_mask))
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        return x

    @staticmethod
    def _dual_attention(block: ResidualAttentionBlock, x: Tensor, cls_query_only: bool = False) -> tuple[Tensor, Tensor]:
        """Standard and value-value attention of one block from the same input, both through out_proj.

        Args:
            x: (B, T, width) the ln_1 output.
            cls_query_only: the standard attention for the CLS query (token 0) alone.

        Returns:
            (B, T, width) softmax(q k^T d^-0.5) v (T = 1 with ``cls_query_only``) and (B, T, width)
            softmax(v v^T d^-0.5) v, per head.
        """
        attention = block.attn
        q, k, v = in_projection(attention, x, x, x)
        # scaled_dot_product_attention scales by head_dim ** -0.5 by default.
        standard = scaled_dot_product_attention(q[:, :, :1] if cls_query_only else q, k, v)
        value_value = scaled_dot_product_attention(v, v, v)
        return out_projection(attention, standard), out_projection(attention, value_value)

    def encode_text(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Standard CLIP text tower, one pass for word and sentence features.

        Not under ``no_grad``: autograd records nothing while every text parameter is frozen (the
        inputs are token ids), and records the fine-tuned ones' graph when ``finetune_text`` is on.

        Args:
            tokens: (B, L) token ids from CLIPTokenizer, L = context_length, zero padded.

        Returns:
            word_features: (B, L, text_width) ln_final output at every position (not projected).
            sentence: (B, embed_dim) ln_final output at the EOT token (largest id) @ text_projection.
        """
        if tokens.dim() != 2 or tokens.shape[1] != self.context_length:
            raise ExpressionError(f"tokens must have shape (B, {self.context_length}), got {tuple(tokens.shape)}")
        clip = self.clip
        x = clip.token_embedding(tokens) + clip.positional_embedding.to(clip.token_embedding.weight.dtype)
        x = self._run_plain_blocks(x, clip.transformer.resblocks, clip.attn_mask)
        word_features = clip.ln_final(x)
        end_of_text = word_features[torch.arange(tokens.shape[0], device=tokens.device), tokens.argmax(dim=-1)]
        return word_features, end_of_text @ clip.text_projection
