"""SAM's prompt encoder and mask decoder, batched over prompt sets of several images.

:class:`SAMMaskHead` drives stock ``segment_anything`` modules with SSP-SAM's learned prompt tokens;
:func:`decode_prompt_sets` and :func:`hypernetwork_masks` are the decoder's two halves (the
two-way transformer, then the upscaling and the mask product), which the SAM-MI proposer uses too.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, PromptEncoder
from segment_anything.modeling.common import LayerNorm2d
from torch import nn

from ..attention import fuse_two_way_attention
from ..errors import ConfigError


class SAMMaskHead(nn.Module):
    """SAM's prompt encoder (frozen) and mask decoder, driven by learned sparse prompt tokens.

    The dense prompt is ``no_mask_embed`` everywhere and the positional encoding is SAM's dense PE,
    exactly as SAM without a mask prompt; only the single-mask output (mask token 0) is computed.

    ``MaskDecoder.forward`` assumes one image per call (it repeats the image embedding once per
    prompt set), so this head runs the decoder's pieces itself, batched over images: the result
    equals calling ``mask_decoder`` image by image. Prompt sets of the same image share its
    embedding (``image_of``): the decoder's work on the image alone is done once per image.
    """

    def __init__(self, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder) -> None:
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = fuse_two_way_attention(mask_decoder)  # image_of needs the fused transformer
        self.prompt_encoder.requires_grad_(False)

    @property
    def embed_dim(self) -> int:
        """Width C of the prompt tokens and image embedding (256 for the official SAMs)."""
        return self.prompt_encoder.embed_dim

    @property
    def image_size(self) -> int:
        """Side S of SAM's padded square input (1024 for the official SAMs)."""
        return self.prompt_encoder.input_image_size[0]

    @torch.no_grad()
    def click_embeddings(self, points: torch.Tensor) -> torch.Tensor:
        """SAM's prompt tokens for single positive clicks.

        Args:
            points: (N, 2) click positions (x, y) in pixels of SAM's input frame.
        Returns:
            (N, C) tokens: the positional encoding of each point plus the positive-point embedding,
            exactly what the prompt encoder gives a one-click prompt.
        """
        labels = torch.ones(points.shape[0], 1, device=points.device)
        sparse, _ = self.prompt_encoder(points=(points[:, None, :], labels), boxes=None, masks=None)
        return sparse[:, 0]  # token 1 of each set is the "not a point" padding

    def forward(
        self, image_embeddings: torch.Tensor, sparse_prompts: torch.Tensor, image_of: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Low-resolution mask logits for each prompt set.

        Args:
            image_embeddings: (B, C, h, w) from SAM's image encoder, one per prompt set; or (U, C, h, w)
                for U images with ``image_of``; or (1, C, h, w), shared by every prompt set.
            sparse_prompts: (B, T, C) prompt tokens, one set per row.
            image_of: (B,) long, the image (row of ``image_embeddings``) of each prompt set. A shared
                image is decoded once until the prompts reach its tokens (the decoder's first block).

        Returns:
            (B, 1, 4h, 4w) logits.
        """
        token_out, image_out = decode_prompt_sets(
            self.prompt_encoder, self.mask_decoder, image_embeddings, sparse_prompts, image_of
        )
        return hypernetwork_masks(self.mask_decoder, token_out, image_out, range(1))  # the single-mask output


def decode_prompt_sets(
    prompt_encoder: PromptEncoder,
    mask_decoder: MaskDecoder,
    image_embeddings: torch.Tensor,
    sparse_prompts: torch.Tensor,
    image_of: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """SAM's mask decoder without a mask prompt, batched over prompt sets of several images.

    What ``MaskDecoder.predict_masks`` computes before its output heads, with the dense prompt SAM
    gives when there is no mask (``no_mask_embed`` everywhere): ``MaskDecoder.forward`` takes one
    image per call and copies its embedding once per prompt set; here each set names its image
    (``image_of``) and the decoder's work on an image alone (its first block's projections of the
    image tokens) runs once per image. ``mask_decoder`` must have been through
    :func:`fuse_two_way_attention` (the stock transformer takes no ``image_of``).

    Args:
        image_embeddings: (B, C, h, w), one per prompt set; or (U, C, h, w) with ``image_of``; or
            (1, C, h, w), shared by every prompt set.
        sparse_prompts: (B, T, C) prompt tokens, one set per row.
        image_of: (B,) long, the image (row of ``image_embeddings``) of each prompt set.

    Returns:
        token_out: (B, 1 + M + T, C), the IoU token, the M mask tokens, then the prompt tokens, as the
            transformer leaves them; image_out: (B, h, w, C), its image tokens on their grid (a mask is a
            hypernetwork output of a mask token dotted with their upscaling: :func:`hypernetwork_masks`).

    Raises:
        ValueError: shapes that do not fit the prompt encoder or each other.
    """
    embedding_size = tuple(prompt_encoder.image_embedding_size)
    channels = prompt_encoder.embed_dim
    if image_embeddings.dim() != 4 or image_embeddings.shape[1:] != (channels, *embedding_size):
        raise ValueError(
            f"image_embeddings: expected (B, {channels}, {embedding_size[0]}, {embedding_size[1]}), "
            f"got {tuple(image_embeddings.shape)}"
        )
    if sparse_prompts.dim() != 3 or sparse_prompts.shape[2] != channels:
        raise ValueError(f"sparse_prompts: expected (B, T, {channels}), got {tuple(sparse_prompts.shape)}")
    num_images, num_sets = image_embeddings.shape[0], sparse_prompts.shape[0]
    if image_of is not None:
        if image_of.shape != (num_sets,) or image_of.dtype != torch.long:
            raise ValueError(f"image_of: expected a ({num_sets},) long tensor, got {tuple(image_of.shape)} {image_of.dtype}")
    elif num_images == 1 and num_sets > 1:
        image_of = torch.zeros(num_sets, dtype=torch.long, device=image_embeddings.device)
    elif num_images != num_sets:
        raise ValueError(
            f"{num_images} image embeddings for {num_sets} prompt sets: "
            "give one embedding per set, one for all, or image_of"
        )

    output_tokens = torch.cat([mask_decoder.iou_token.weight, mask_decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat([output_tokens.expand(num_sets, -1, -1), sparse_prompts], dim=1)

    # Without a mask prompt SAM adds no_mask_embed to every position of the image embedding.
    dense = prompt_encoder.no_mask_embed.weight.view(1, channels, 1, 1)
    image_tokens = image_embeddings + dense
    image_pe = prompt_encoder.get_dense_pe()  # (1, C, h, w), the same for every set

    token_out, image_out = mask_decoder.transformer(image_tokens, image_pe, tokens, image_of=image_of)
    return token_out, image_out.view(num_sets, *embedding_size, channels)


def hypernetwork_masks(
    mask_decoder: MaskDecoder, token_out: torch.Tensor, image_out: torch.Tensor, outputs: range
) -> torch.Tensor:
    """SAM's mask logits of the mask tokens ``outputs`` (0: the single-mask output; 1-3: the three
    multimask outputs), from :func:`decode_prompt_sets`' results: each token's hypernetwork output
    dotted with the image tokens after ``output_upscaling``. SAM computes all four and keeps some;
    only these run here.

    ``output_upscaling`` (two 2x2 stride-2 transposed convolutions with a channel layer norm and
    activations between) maps every image token to its own 4x4 block of output pixels, and every step
    of it, the mask product too, is per position: it runs here on the tokens as they come (B, h, w, C),
    each transposed convolution as one matrix product onto the 2x2 sub-pixels, and only the logits,
    C / 8 times smaller than the upscaled features, are put in image order at the end. Equal to the
    stock module followed by the product (tested); on a CPU, oneDNN's transposed convolutions and
    SAM's elementwise ``LayerNorm2d`` cost several times these products, and the stock path's
    channels-last activations made their backward mix memory layouts.

    Args:
        token_out: (B, 1 + M + T, C), the transformer's tokens.
        image_out: (B, h, w, C), the transformer's image tokens on their grid.

    Returns:
        (B, len(outputs), 4h, 4w) logits.
    """
    first, norm, first_act, second, second_act = _stock_output_upscaling(mask_decoder)
    sub_pixels = _transposed_conv_2x2(image_out, first)  # (B, h, w, 4, C / 4), sub-pixel (i, j) of each token
    sub_pixels = first_act(F.layer_norm(sub_pixels, norm.weight.shape, norm.weight, norm.bias, norm.eps))
    sub_pixels = second_act(_transposed_conv_2x2(sub_pixels, second))  # (B, h, w, 4, 4, C / 8): (i, j), then (k, l)
    # Token 0 is the IoU token; mask token i is token 1 + i.
    weights = torch.stack([mask_decoder.output_hypernetworks_mlps[i](token_out[:, 1 + i]) for i in outputs], dim=2)
    logits = sub_pixels.flatten(1, 4) @ weights  # (B, h w 16, m)
    # Output pixel (4y + 2i + k, 4x + 2j + l) of token (y, x), sub-pixels (i, j) and (k, l).
    h, w = image_out.shape[1:3]
    logits = logits.view(logits.shape[0], h, w, 2, 2, 2, 2, len(outputs)).permute(0, 7, 1, 3, 5, 2, 4, 6)
    return logits.reshape(logits.shape[0], len(outputs), 4 * h, 4 * w)


def _stock_output_upscaling(mask_decoder: MaskDecoder) -> Tuple[nn.Module, ...]:
    """The five layers of segment_anything's ``output_upscaling``, checked to be what
    :func:`hypernetwork_masks` computes (stock ``MaskDecoder`` always builds them so)."""
    layers = tuple(mask_decoder.output_upscaling)
    convolutions_fit = len(layers) == 5 and all(
        isinstance(layer, nn.ConvTranspose2d)
        and layer.kernel_size == (2, 2)
        and layer.stride == (2, 2)
        and layer.padding == (0, 0)
        and layer.output_padding == (0, 0)
        and layer.dilation == (1, 1)
        and layer.groups == 1
        and layer.bias is not None
        for layer in layers[::3]
    )
    if not convolutions_fit or not isinstance(layers[1], LayerNorm2d):
        raise ConfigError(
            "mask_decoder.output_upscaling: expected segment_anything's ConvTranspose2d(2, stride 2), LayerNorm2d, "
            f"activation, ConvTranspose2d(2, stride 2), activation; got {[type(layer).__name__ for layer in layers]}"
        )
    return layers


def _transposed_conv_2x2(x: torch.Tensor, convolution: nn.ConvTranspose2d) -> torch.Tensor:
    """A 2x2 stride-2 transposed convolution, position by position: (..., C_in) -> (..., 4, C_out),
    the four outputs of each input position in row-major sub-pixel order (i, j)."""
    in_channels, out_channels = convolution.in_channels, convolution.out_channels
    # weight (C_in, C_out, 2, 2): output (2y + i, 2x + j) of input (y, x) gets x @ weight[:, :, i, j].
    weight = convolution.weight.permute(2, 3, 1, 0).reshape(4 * out_channels, in_channels)
    return F.linear(x, weight, convolution.bias.repeat(4)).unflatten(-1, (4, out_channels))
