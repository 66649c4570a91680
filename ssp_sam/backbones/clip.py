"""The frozen CLIP side of SSP-SAM: model building, checkpoint loading, CLIP Surgery, tokenizer, letterbox.

SSP-SAM reads a referring expression with CLIP's text tower and the image with CLIP's vision tower in
its "CLIP Surgery" form: the last blocks get a second, value-value attention path whose tokens keep
their own location, giving patch features that line up with the text embedding. No new parameters are
involved, so the open_clip model with OpenAI weights is used as is and only the forward pass changes.

Also here are the matching inputs: the BPE tokenizer with the period the release appends, and the
letterbox that puts an image into CLIP's square (with the box conversions between the two frames).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError, ExpressionError, ImageError
from ..safe_pickle import is_torchscript_archive
from ..state_dicts import mismatch_report
from ..weight_files import describe_weights, read_weights, require_finite

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

OPEN_CLIP_ARCHS = ("ViT-B-16", "ViT-L-14-336")
# Released CLIP ViTs a weight file is recognised as (open_clip's names), by their vision shapes.
_KNOWN_VITS = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "ViT-g-14", "ViT-bigG-14")
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
_CUSTOM_DEFAULTS = {"context_length": 77, "vocab_size": 49408}

# Scalars stored in OpenAI's state dicts that are not weights of the model.
_OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")
_SHOWN_KEYS = 3


# ---------------------------------------------------------------------------------------------------
# Model building and checkpoint loading
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
            vision_head_width, text_width, text_layers, text_heads, and optionally context_length (77)
            and vocab_size (49408, the BPE tokenizer's vocabulary).

    Returns:
        The model in eval mode with ``requires_grad`` False on every parameter.
    """
    if arch in OPEN_CLIP_ARCHS:
        if custom is not None:
            raise ConfigError(f"CLIP arch {arch!r} takes its config from open_clip; 'custom' must be None")
        config = open_clip.get_model_config(arch)
        model = CLIP(**config, quick_gelu=True)
    elif arch == CUSTOM_ARCH:
        model = CLIP(**_custom_config(custom), quick_gelu=True)
    else:
        raise ConfigError(f"unknown CLIP arch {arch!r}; expected one of {(*OPEN_CLIP_ARCHS, CUSTOM_ARCH)}")

    if checkpoint is not None:
        state_dict, file_format = _read_state_dict(Path(checkpoint))
        _check_state_dict(state_dict, model, Path(checkpoint), arch, file_format)
        require_finite(state_dict, checkpoint)
        model.load_state_dict(state_dict)

    model.eval()
    model.requires_grad_(False)
    return model


def _custom_config(custom: Mapping | None) -> dict:
    """Turn the flat "custom" mapping into open_clip's CLIP keyword arguments."""
    if custom is None:
        raise ConfigError("CLIP arch 'custom' needs the 'custom' mapping of sizes")
    values = {**_CUSTOM_DEFAULTS, **dict(custom)}
    missing = [key for key in _CUSTOM_REQUIRED if key not in values]
    unknown = sorted(set(values) - set(_CUSTOM_REQUIRED) - set(_CUSTOM_DEFAULTS))
    if missing or unknown:
        raise ConfigError(f"custom CLIP config: missing keys {missing}, unknown keys {unknown}")
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
    return {"embed_dim": values["embed_dim"], "vision_cfg": vision_cfg, "text_cfg": text_cfg}


def _read_state_dict(path: Path) -> tuple[dict[str, Tensor], str]:
    """Read any of the supported checkpoint formats into a flat {key: tensor} dict on the CPU.

    Nothing in the file is run (:func:`ssp_sam.weight_files.read_weights`); OpenAI's TorchScript
    archives are read by the restricted reader of :mod:`ssp_sam.safe_pickle`.

    Returns:
        The state dict and the file's format, for messages ("an OpenAI TorchScript archive", ...).
    """
    loaded = read_weights(path, "CLIP checkpoint")
    if path.suffix == ".safetensors":
        file_format = "a safetensors file"
    elif is_torchscript_archive(path):
        file_format = "a TorchScript archive (OpenAI's format)"
    elif isinstance(loaded, Mapping) and "state_dict" in loaded:
        file_format = "an open_clip training checkpoint"
        loaded = loaded["state_dict"]
    else:
        file_format = "a state dict"
    if not isinstance(loaded, Mapping) or not all(
        isinstance(key, str) and isinstance(value, Tensor) for key, value in loaded.items()
    ):
        raise CheckpointError(f"{path}: CLIP checkpoint does not hold a state dict of tensors")
    state_dict = {key.removeprefix("module."): value for key, value in loaded.items()}
    for key in _OPENAI_METADATA_KEYS:
        state_dict.pop(key, None)
    return state_dict, file_format


def _check_state_dict(state_dict: Mapping[str, Tensor], model: nn.Module, path: Path, arch: str, file_format: str) -> None:
    """Raise CheckpointError saying what the file holds and listing the first mismatched keys, if any."""
    report = mismatch_report(state_dict, model.state_dict(), first=("visual.",), limit=_SHOWN_KEYS)
    if report is None:
        return
    held = describe_clip_weights(state_dict) or describe_weights(state_dict) or "an unknown model"
    raise CheckpointError(f"{path}: {file_format} of {held}, not of CLIP {arch!r}: {report}")


def describe_clip_weights(state_dict: Mapping[str, Tensor]) -> str | None:
    """Which CLIP ViT a state dict holds, from its vision tower's shapes; None if it holds no CLIP ViT.

    e.g. "CLIP ViT-L-14-336 (visual width 1024, 24 blocks, patch 14, image size 336)", so a ViT-L
    file given for ViT-B-16 is recognised at once.
    """
    conv = state_dict.get("visual.conv1.weight")
    positions = state_dict.get("visual.positional_embedding")
    if conv is None or positions is None or conv.dim() != 4 or positions.dim() != 2:
        return None
    width, patch = conv.shape[0], conv.shape[-1]
    image_size = patch * math.isqrt(positions.shape[0] - 1)
    blocks = len({key.split(".")[3] for key in state_dict if key.startswith("visual.transformer.resblocks.")})
    sizes = f"visual width {width}, {blocks} blocks, patch {patch}, image size {image_size}"
    for name in _KNOWN_VITS:
        vision = open_clip.get_model_config(name)["vision_cfg"]
        if (vision["width"], vision["layers"], vision["patch_size"], vision["image_size"]) == (width, blocks, patch, image_size):
            return f"CLIP {name} ({sizes})"
    return f"a CLIP ViT of no released size ({sizes})"


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

    Stays in eval mode with frozen parameters; both encoders run without autograd.
    """

    def __init__(self, model: CLIP, surgery_blocks: int = 6) -> None:
        super().__init__()
        visual = model.visual
        if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None or visual.pool_type != "tok":
            raise ConfigError("CLIPSurgeryBackbone needs an open_clip CLIP with a plain ViT image tower")
        blocks = visual.transformer.resblocks
        if not all(isinstance(block, ResidualAttentionBlock) for block in blocks):
            raise ConfigError("CLIPSurgeryBackbone needs open_clip's default ResidualAttentionBlock vision blocks")
        if not 0 <= surgery_blocks <= len(blocks):
            raise ConfigError(f"surgery_blocks={surgery_blocks} must lie in [0, {len(blocks)}] (vision blocks)")
        self.clip = model
        self.surgery_blocks = surgery_blocks
        self.clip.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> CLIPSurgeryBackbone:
        """CLIP is frozen in SSP-SAM: ignore ``mode`` and stay in eval mode."""
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

    @torch.no_grad()
    def encode_image(self, pixels: Tensor) -> Tensor:
        """CLIP-Surgery image tokens.

        Args:
            pixels: (B, 3, S, S) images already letterboxed and normalised with CLIP_MEAN / CLIP_STD.

        Returns:
            (B, 1 + N, embed_dim): token 0 is CLIP's usual image embedding (the CLS token of the
            original stream), tokens 1..N the surgery-stream patch tokens in row-major grid order.
        """
        size = self.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ImageError(f"pixels must have shape (B, 3, {size}, {size}), got {tuple(pixels.shape)}")
        visual = self.clip.visual
        blocks = visual.transformer.resblocks
        first_dual = len(blocks) - self.surgery_blocks

        x = self._embed_patches(pixels.to(visual.conv1.weight.dtype))
        x = self._run_plain_blocks(x, blocks[:first_dual])

        original = x
        surgery = x
        for block in blocks[first_dual:]:
            standard_attention, value_attention = self._dual_attention(block, block.ln_1(original))
            surgery = surgery + block.ls_1(value_attention)
            original = original + block.ls_1(standard_attention)
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

    def _run_plain_blocks(self, x: Tensor, blocks: nn.ModuleList) -> Tensor:
        """Unchanged open_clip blocks (no attention mask for vision), in the transformer's own layout."""
        sequence_first = not self.clip.visual.transformer.batch_first
        if sequence_first:
            x = x.transpose(0, 1)
        for block in blocks:
            x = block(x)
        return x.transpose(0, 1) if sequence_first else x

    @staticmethod
    def _dual_attention(block: ResidualAttentionBlock, x: Tensor) -> tuple[Tensor, Tensor]:
        """Standard and value-value attention of one block from the same input, both through out_proj.

        Args:
            x: (B, T, width) the ln_1 output.

        Returns:
            Two (B, T, width) tensors: softmax(q k^T d^-0.5) v and softmax(v v^T d^-0.5) v, per head.
        """
        attention = block.attn
        batch, length, width = x.shape
        heads = attention.num_heads
        qkv = F.linear(x, attention.in_proj_weight, attention.in_proj_bias)
        q, k, v = qkv.reshape(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)

        def project(per_head: Tensor) -> Tensor:
            return attention.out_proj(per_head.transpose(1, 2).reshape(batch, length, width))

        # scaled_dot_product_attention scales by head_dim ** -0.5 by default.
        standard = F.scaled_dot_product_attention(q, k, v)
        value_value = F.scaled_dot_product_attention(v, v, v)
        return project(standard), project(value_value)

    @torch.no_grad()
    def encode_text(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Standard CLIP text tower, one pass for word and sentence features.

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
        x = clip.transformer(x, attn_mask=clip.attn_mask)
        word_features = clip.ln_final(x)
        end_of_text = word_features[torch.arange(tokens.shape[0], device=tokens.device), tokens.argmax(dim=-1)]
        return word_features, end_of_text @ clip.text_projection


# ---------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------


class ExpressionTruncatedWarning(UserWarning):
    """An expression had more BPE tokens than CLIP's context holds and was cut."""


class CLIPTokenizer:
    """CLIP's BPE tokenizer (open_clip's bundled vocabulary, offline) with SSP-SAM's text convention.

    The release feeds CLIP "{expr}." with the period appended unconditionally, so an expression
    already ending in "." gets a second one; ``append_period=True`` reproduces that exactly,
    ``append_period=False`` tokenizes the expression as given.
    """

    def __init__(self, context_length: int = 77, append_period: bool = True) -> None:
        if context_length < 2:
            raise ConfigError(f"context_length={context_length} leaves no room for the start and end tokens")
        self.context_length = context_length
        self.append_period = append_period
        self._bpe = SimpleTokenizer(context_length=context_length)

    def __call__(self, expressions: Sequence[str]) -> Tensor:
        """Token ids (B, context_length), int64: start token, BPE ids, end token, zero padding.

        Expressions that do not fit are cut to context_length with the end token kept last, as CLIP
        does, and an ExpressionTruncatedWarning names them.
        """
        if isinstance(expressions, str):
            raise ExpressionError("expressions must be a sequence of strings, got a single string")
        start, end = self._bpe.sot_token_id, self._bpe.eot_token_id
        tokens = torch.zeros(len(expressions), self.context_length, dtype=torch.long)
        for index, expression in enumerate(expressions):
            if not isinstance(expression, str) or not expression.strip():
                raise ExpressionError(f"expression {index} is not a non-empty string: {expression!r}")
            text = f"{expression}." if self.append_period else expression
            ids = [start, *self._bpe.encode(text), end]
            if len(ids) > self.context_length:
                warnings.warn(
                    f"expression {index} has {len(ids)} tokens, cut to {self.context_length}: {expression!r}",
                    ExpressionTruncatedWarning,
                    stacklevel=2,
                )
                ids = [*ids[: self.context_length - 1], end]
            tokens[index, : len(ids)] = torch.tensor(ids)
        return tokens


# ---------------------------------------------------------------------------------------------------
# Letterbox
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Letterbox:
    """Where an image went inside CLIP's size x size square.

    The image was resized by ``scale`` = size / max(H, W) to ``width`` x ``height`` pixels and pasted
    with its top-left corner at (``offset_x``, ``offset_y``).
    """

    scale: float
    offset_x: int
    offset_y: int
    width: int
    height: int
    size: int

    def box_to_image(self, boxes_cxcywh_norm: Tensor) -> Tensor:
        """(..., 4) cx, cy, w, h normalised to the square -> (..., 4) x1, y1, x2, y2 in original-image pixels.

        Boxes are not clipped to the image (a prediction may reach into the padding).
        """
        center_x, center_y, box_width, box_height = (boxes_cxcywh_norm * self.size).unbind(-1)
        x1 = (center_x - box_width / 2 - self.offset_x) / self.scale
        y1 = (center_y - box_height / 2 - self.offset_y) / self.scale
        x2 = (center_x + box_width / 2 - self.offset_x) / self.scale
        y2 = (center_y + box_height / 2 - self.offset_y) / self.scale
        return torch.stack([x1, y1, x2, y2], dim=-1)

    def box_from_image(self, boxes_xyxy: Tensor) -> Tensor:
        """(..., 4) x1, y1, x2, y2 in original-image pixels -> (..., 4) cx, cy, w, h normalised to the square."""
        x1, y1, x2, y2 = boxes_xyxy.to(torch.float32).unbind(-1)
        x1 = x1 * self.scale + self.offset_x
        x2 = x2 * self.scale + self.offset_x
        y1 = y1 * self.scale + self.offset_y
        y2 = y2 * self.scale + self.offset_y
        return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1) / self.size


def letterbox_image(
    image: np.ndarray,
    size: int,
    placement: str | tuple[int, int] = "center",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Letterbox]:
    """Put an RGB image into CLIP's square: long side to ``size``, aspect kept, zero padding after normalising.

    Args:
        image: (H, W, 3) uint8 RGB.
        size: side of the square (the CLIP image size).
        placement: "center" (test time, floor((size - new) / 2) offsets), "random" (training: uniform
            integer offsets drawn from ``generator``) or explicit (offset_x, offset_y).
        generator: random source for "random" placement.

    Returns:
        pixels: (3, size, size) float32, CLIP-normalised; the padding is exactly 0.
        letterbox: the placement, for mapping boxes and masks between the two frames.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        description = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ImageError(f"image must be a uint8 (H, W, 3) array, got {description}")
    box = _place(image.shape[0], image.shape[1], size, placement, generator)

    pixels = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0).to(torch.float32)
    pixels = F.interpolate(pixels, size=(box.height, box.width), mode="bicubic", antialias=True, align_corners=False)
    pixels = pixels.clamp(0.0, 255.0)[0] / 255.0
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)

    square = torch.zeros(3, size, size)
    square[:, box.offset_y : box.offset_y + box.height, box.offset_x : box.offset_x + box.width] = (pixels - mean) / std
    return square, box


def letterbox_mask(mask: np.ndarray, box: Letterbox) -> Tensor:
    """A (H, W) bool mask of the original image -> (size, size) float 0/1 in the square (nearest, zero padding).

    Uses "nearest-exact" (pixel-centre) sampling so the mask stays aligned with the bicubic image.
    """
    if not isinstance(mask, np.ndarray) or mask.ndim != 2:
        description = f"shape {mask.shape}" if isinstance(mask, np.ndarray) else type(mask).__name__
        raise ImageError(f"mask must be a 2-D (H, W) array, got {description}")
    expected = _resized_shape(mask.shape[0], mask.shape[1], box.size)
    if expected != (box.height, box.width):
        raise ImageError(
            f"mask of shape {mask.shape} does not belong to this letterbox ({box.height}x{box.width} content)"
        )
    values = torch.from_numpy(mask.astype(np.float32))[None, None]
    values = F.interpolate(values, size=(box.height, box.width), mode="nearest-exact")[0, 0]
    square = torch.zeros(box.size, box.size)
    square[box.offset_y : box.offset_y + box.height, box.offset_x : box.offset_x + box.width] = values
    return square


def _resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(new_height, new_width) after scaling the long side to ``size``; never below one pixel."""
    scale = size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _place(
    height: int, width: int, size: int, placement: str | tuple[int, int], generator: torch.Generator | None
) -> Letterbox:
    """Compute the Letterbox of an height x width image for the requested placement."""
    if height < 1 or width < 1:
        raise ImageError(f"image of shape ({height}, {width}) is empty")
    new_height, new_width = _resized_shape(height, width, size)
    free_x, free_y = size - new_width, size - new_height
    if placement == "center":
        offset_x, offset_y = free_x // 2, free_y // 2
    elif placement == "random":
        offset_x = int(torch.randint(0, free_x + 1, (), generator=generator))
        offset_y = int(torch.randint(0, free_y + 1, (), generator=generator))
    elif isinstance(placement, (tuple, list)) and len(placement) == 2:
        offset_x, offset_y = (int(value) for value in placement)
        if not (0 <= offset_x <= free_x and 0 <= offset_y <= free_y):
            raise ConfigError(
                f"placement {placement} puts the {new_width}x{new_height} image outside the {size}x{size} square"
            )
    else:
        raise ConfigError(f"placement must be 'center', 'random' or (offset_x, offset_y), got {placement!r}")
    return Letterbox(
        scale=size / max(height, width),
        offset_x=offset_x,
        offset_y=offset_y,
        width=new_width,
        height=new_height,
        size=size,
    )
