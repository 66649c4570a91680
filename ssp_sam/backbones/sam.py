"""SAM as SSP-SAM uses it: building and loading, the image transform, the mask head, mask geometry.

SSP-SAM feeds learned prompt tokens to stock ``segment_anything`` modules (spec "SAM mask decoder"),
so this module builds those modules rather than re-implementing them. What it adds:

- :func:`build_sam`: the official variants and small custom configurations, built only for the
  parts a caller needs, loaded safely (``weights_only=True``) and validated key by key.
- :class:`SAMImageTransform`: SamPredictor's resize followed by ``Sam.preprocess``, as one call.
- :class:`SAMMaskHead`: prompt encoder + mask decoder with a batched forward (one prompt set per
  image, or many prompt sets sharing one image), on :func:`decode_prompt_sets`, which the SAM-MI
  proposer uses too.
- The three frames a mask lives in: SAM's low-resolution logits (``4 * S / patch`` per side), the
  "padded frame" (the letterboxed ``S x S`` input at half resolution, where training losses are
  computed) and the original image.

Parts not requested from :func:`build_sam` are ``None`` on the returned ``Sam``; ``Sam.preprocess``
and ``Sam.postprocess_masks`` need ``image_encoder`` (for ``img_size``), the functions here do not.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache, partial
from typing import Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.image_encoder import PatchEmbed
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn

from ..attention import fuse_image_encoder_attention, fuse_two_way_attention
from ..errors import CheckpointError, ConfigError, ImageError
from ..fileio import file_sha256
from ..state_dicts import mismatch_report
from ..weight_files import describe_weights, read_weights, require_finite

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)

SAM_PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")

# Encoder hyper-parameters of the released SAM models (segment_anything.build_sam).
SAM_VARIANTS = {
    "vit_b": {
        "encoder_embed_dim": 768,
        "encoder_depth": 12,
        "encoder_num_heads": 12,
        "encoder_global_attn_indexes": (2, 5, 8, 11),
    },
    "vit_l": {
        "encoder_embed_dim": 1024,
        "encoder_depth": 24,
        "encoder_num_heads": 16,
        "encoder_global_attn_indexes": (5, 11, 17, 23),
    },
    "vit_h": {
        "encoder_embed_dim": 1280,
        "encoder_depth": 32,
        "encoder_num_heads": 16,
        "encoder_global_attn_indexes": (7, 15, 23, 31),
    },
}

# Everything else is shared by all released variants; a "custom" config may change it.
_SHARED_DEFAULTS = {
    "image_size": 1024,
    "patch_size": 16,
    "window_size": 14,
    "prompt_embed_dim": 256,
    "decoder_depth": 2,
    "decoder_mlp_dim": 2048,
    "decoder_num_heads": 8,
    "mlp_ratio": 4,
}

# How many keys of each kind a CheckpointError lists before "...".
_KEYS_SHOWN = 5


def _resolve_config(variant: str, custom: Optional[Mapping]) -> dict:
    """The full hyper-parameter dict for a variant name (and the custom mapping for "custom")."""
    if variant == "custom":
        if custom is None:
            raise ConfigError("SAM variant 'custom' needs a `custom` mapping of hyper-parameters")
        unknown = sorted(set(custom) - set(SAM_VARIANTS["vit_b"]) - set(_SHARED_DEFAULTS))
        if unknown:
            raise ConfigError(f"custom SAM config: unknown keys {unknown}")
        missing = sorted(set(SAM_VARIANTS["vit_b"]) - set(custom))
        if missing:
            raise ConfigError(f"custom SAM config: missing keys {missing}")
        config = {**_SHARED_DEFAULTS, **custom}
    elif variant in SAM_VARIANTS:
        if custom is not None:
            raise ConfigError(f"SAM variant {variant!r} is fixed; `custom` is only for variant 'custom'")
        config = {**_SHARED_DEFAULTS, **SAM_VARIANTS[variant]}
    else:
        raise ConfigError(f"unknown SAM variant {variant!r}; expected one of {[*SAM_VARIANTS, 'custom']}")

    if config["image_size"] % config["patch_size"] != 0:
        raise ConfigError(
            f"SAM config: image_size {config['image_size']} is not a multiple of "
            f"patch_size {config['patch_size']}"
        )
    outside = [i for i in config["encoder_global_attn_indexes"] if not 0 <= i < config["encoder_depth"]]
    if outside:
        raise ConfigError(
            f"SAM config: encoder_global_attn_indexes {outside} outside depth {config['encoder_depth']}"
        )
    return config


class ContiguousPatchEmbed(PatchEmbed):
    """segment_anything's ``PatchEmbed`` with its (B, H, W, C) output laid out contiguously.

    The stock module returns the convolution's (B, C, H, W) output permuted, a view whose channels are
    H * W apart. Elementwise operations keep their inputs' layout, so the encoder's whole residual
    stream stayed in that layout through every block: each residual add, layer norm and cast walked
    across rows. One copy here makes them contiguous: SAM ViT-B at 1024 px ran 1.70 -> 1.21 s in bf16
    and 4.78 -> 4.26 s in fp32 (2 cores with AMX, benchmarks/README.md). Values are unchanged
    (bit-identical in bf16; in fp32 within 1e-5 of the stock layout, the matrix products summing in
    another order). Same parameters and state-dict keys.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, S / patch, S / patch, C), contiguous."""
        return super().forward(x).contiguous()


def _image_encoder(config: Mapping) -> ImageEncoderViT:
    """SAM's ViT image encoder with the contiguous patch embedding and the fused attention (same weights)."""
    encoder = ImageEncoderViT(
        depth=config["encoder_depth"],
        embed_dim=config["encoder_embed_dim"],
        img_size=config["image_size"],
        mlp_ratio=config["mlp_ratio"],
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_heads=config["encoder_num_heads"],
        patch_size=config["patch_size"],
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=tuple(config["encoder_global_attn_indexes"]),
        window_size=config["window_size"],
        out_chans=config["prompt_embed_dim"],
    )
    encoder.patch_embed.__class__ = ContiguousPatchEmbed
    return fuse_image_encoder_attention(encoder)


def _build_parts(config: Mapping, parts: Sequence[str]) -> dict:
    """Construct the requested SAM modules (randomly initialised, on the current default device)."""
    embedding_side = config["image_size"] // config["patch_size"]
    builders = {
        "image_encoder": lambda: _image_encoder(config),
        "prompt_encoder": lambda: PromptEncoder(
            embed_dim=config["prompt_embed_dim"],
            image_embedding_size=(embedding_side, embedding_side),
            input_image_size=(config["image_size"], config["image_size"]),
            mask_in_chans=16,
        ),
        "mask_decoder": lambda: fuse_two_way_attention(MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=config["decoder_depth"],
                embedding_dim=config["prompt_embed_dim"],
                mlp_dim=config["decoder_mlp_dim"],
                num_heads=config["decoder_num_heads"],
            ),
            transformer_dim=config["prompt_embed_dim"],
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        )),
    }
    return {name: builders[name]() for name in parts}


def _read_state_dict(path: str) -> dict:
    """Load a flat SAM state dict from ``path``; accepts Meta's .pth and a {"model": state_dict} container.

    Read without running code from the file (:func:`ssp_sam.weight_files.read_weights`). Zip-format
    files are memory-mapped, so loading only the mask decoder from a 2.5 GB ViT-H checkpoint reads
    only the decoder's bytes.
    """
    loaded = read_weights(path, "SAM checkpoint", mmap=True)
    if isinstance(loaded, Mapping) and isinstance(loaded.get("model"), Mapping):
        loaded = loaded["model"]
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(loaded).__name__}")
    not_tensors = [key for key, value in loaded.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{path}: entries that are not tensors: {_first_keys(not_tensors)}")
    return dict(loaded)


def _first_keys(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_KEYS_SHOWN])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _KEYS_SHOWN else "")


def describe_sam_weights(state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """Which SAM a state dict holds, from its image encoder's width and depth, e.g.
    "SAM vit_b (image encoder width 768, 12 blocks)"; None without a SAM image encoder.

    The released variants differ in width, so a file with fewer blocks than its width's variant
    (a truncated file) is named as an incomplete one.
    """
    patch_weight = state_dict.get("image_encoder.patch_embed.proj.weight")
    if patch_weight is None or patch_weight.dim() != 4:
        return None
    width = patch_weight.shape[0]
    depth = len({key.split(".")[2] for key in state_dict if key.startswith("image_encoder.blocks.")})
    for name, hyper in SAM_VARIANTS.items():
        if hyper["encoder_embed_dim"] == width:
            if hyper["encoder_depth"] == depth:
                return f"SAM {name} (image encoder width {width}, {depth} blocks)"
            return f"an incomplete SAM {name} (image encoder width {width}, {depth} of {hyper['encoder_depth']} blocks)"
    return f"a SAM of no released variant (image encoder width {width}, {depth} blocks)"


def _check_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    parts: Sequence[str],
    path: str,
    variant: str,
) -> None:
    """Raise CheckpointError unless ``state_dict`` fits ``expected`` (the full model's state dict).

    Every key in the file must belong to the model with the same shape, also for parts not
    requested (a ViT-L file must not pass as a ViT-B one because only the decoder was asked for);
    every key of a requested part must be present. The message says what the file holds: which
    SAM (from its image encoder's shapes), or which other model.
    """
    report = mismatch_report(
        state_dict, expected, required=lambda key: key.split(".")[0] in parts, first=("image_encoder.patch_embed.",)
    )
    if report is None:
        return
    is_sam = any(key.startswith(tuple(f"{part}." for part in SAM_PARTS)) for key in state_dict)
    held = describe_sam_weights(state_dict) if is_sam else describe_weights(state_dict)
    if held is not None and not held.startswith(f"SAM {variant} "):
        raise CheckpointError(f"{path}: this is {held}, not SAM {variant}; {report}")
    raise CheckpointError(f"{path}: does not fit SAM {variant}: {report}")


def build_sam(
    variant: str,
    checkpoint: str | os.PathLike | None = None,
    custom: Mapping | None = None,
    parts: Sequence[str] = SAM_PARTS,
) -> Sam:
    """Build SAM (in eval mode) like ``segment_anything.build_sam``, optionally loading ``checkpoint``.

    Args:
        variant: "vit_b", "vit_l", "vit_h" or "custom".
        checkpoint: Meta's official .pth (flat state dict) or a {"model": state_dict} container.
            Without it the modules keep their random initialisation.
        custom: for variant "custom": encoder_embed_dim, encoder_depth, encoder_num_heads,
            encoder_global_attn_indexes and optionally image_size, patch_size, window_size,
            prompt_embed_dim, decoder_depth, decoder_mlp_dim, decoder_num_heads, mlp_ratio
            (defaults: the released models' values).
        parts: the modules to build and load; the others are ``None`` on the returned ``Sam`` and
            are never allocated (the SSP model needs no ViT-H, the embedding cache no decoder).

    Raises:
        ConfigError: unknown variant, part or custom key.
        CheckpointError: file missing or unreadable, or keys / shapes that do not fit.
    """
    unknown_parts = sorted(set(parts) - set(SAM_PARTS))
    if unknown_parts or not parts:
        raise ConfigError(f"SAM parts must be a non-empty subset of {list(SAM_PARTS)}, got {list(parts)}")
    config = _resolve_config(variant, custom)

    if checkpoint is None:
        modules = _build_parts(config, parts)
    else:
        path = os.fspath(checkpoint)
        state_dict = _read_state_dict(path)
        # Shapes of the whole model without allocating it: validation covers every key in the file.
        with torch.device("meta"):
            expected = {
                f"{name}.{key}": tensor
                for name, module in _build_parts(config, SAM_PARTS).items()
                for key, tensor in module.state_dict().items()
            }
            modules = _build_parts(config, parts)
        _check_state_dict(state_dict, expected, parts, path, variant)
        for name, module in modules.items():
            prefix = f"{name}."
            # clone() gives each module its own memory instead of pages of the mapped file.
            part_state = {
                key[len(prefix):]: tensor.to(expected[key].dtype).clone()
                for key, tensor in state_dict.items()
                if key.startswith(prefix)
            }
            require_finite({prefix + key: tensor for key, tensor in part_state.items()}, path)
            module.load_state_dict(part_state, assign=True)

    sam = Sam(
        image_encoder=modules.get("image_encoder"),
        prompt_encoder=modules.get("prompt_encoder"),
        mask_decoder=modules.get("mask_decoder"),
        pixel_mean=list(PIXEL_MEAN),
        pixel_std=list(PIXEL_STD),
    )
    return sam.eval()


def sam_weights_fingerprint(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a weights file, read in chunks; keys the embedding cache to the encoder weights."""
    try:
        return file_sha256(path, chunk_bytes)
    except OSError as error:
        raise CheckpointError(f"{os.fspath(path)}: cannot read SAM weights ({error.strerror or error})") from error


class SAMImageTransform:
    """SAM's input pipeline: what ``SamPredictor.set_image`` then ``Sam.preprocess`` compute.

    The long side is resized to ``image_size`` by ``ResizeLongestSide`` (PIL bilinear on uint8),
    pixels are normalised with SAM's mean / std on the 0..255 scale, and the result is padded with
    zeros on the right and bottom to ``image_size x image_size``.
    """

    def __init__(self, image_size: int = 1024) -> None:
        self.image_size = image_size
        self.resize = ResizeLongestSide(image_size)
        self.pixel_mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
        self.pixel_std = torch.tensor(PIXEL_STD).view(3, 1, 1)

    def input_size_for(self, original_size: Tuple[int, int]) -> Tuple[int, int]:
        """(h, w) of the resized image inside the padded square, for an (H, W) original."""
        return ResizeLongestSide.get_preprocess_shape(original_size[0], original_size[1], self.image_size)

    def __call__(self, image: np.ndarray) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """uint8 RGB (H, W, 3) -> (normalised padded image (3, S, S) float32, input_size (h, w))."""
        if not isinstance(image, np.ndarray):
            raise ImageError(f"image: expected a uint8 RGB array (H, W, 3), got {type(image).__name__}")
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ImageError(f"image: expected a uint8 RGB array (H, W, 3), got {image.dtype} {image.shape}")
        resized = torch.from_numpy(self.resize.apply_image(image)).permute(2, 0, 1)
        normalised = (resized - self.pixel_mean) / self.pixel_std
        h, w = normalised.shape[-2:]
        padded = F.pad(normalised, (0, self.image_size - w, 0, self.image_size - h))
        return padded, (h, w)


def upscale_to_padded_frame(low_res_logits: torch.Tensor, image_size: int) -> torch.Tensor:
    """SAM's low-resolution logits (B, M, s, s) -> the padded frame (B, M, S/2, S/2).

    As the release does it: bilinear (align_corners=False) to S x S, then bilinear to S/2 x S/2
    (256 -> 1024 -> 512 for S = 1024). The release also crops [:S, :S] in between, which is a
    no-op on an S x S map. The two steps are not the same as one direct resize; kept for parity.

    Both resizes are linear and separable, so their composition is one (S/2, s) matrix R applied to
    the rows and the columns, ``R @ logits @ R^T``: two matrix products instead of the S x S
    intermediate and its backward (several times faster; equal to float rounding, tested against
    ``F.interpolate``). R's entries are multiples of 1/16 for S = 4 s, exact in bf16 too.
    """
    low_res = low_res_logits.shape[-1]
    if low_res_logits.shape[-2] != low_res:
        raise ValueError(f"low_res_logits: expected square maps, got {tuple(low_res_logits.shape)}")
    resize = _two_step_resize_matrix(low_res, image_size, low_res_logits.device).to(low_res_logits.dtype)
    return resize @ low_res_logits @ resize.T


@lru_cache(maxsize=8)
def _two_step_resize_matrix(low_res: int, image_size: int, device: torch.device) -> torch.Tensor:
    """The (S/2, s) matrix of :func:`upscale_to_padded_frame`'s two bilinear resizes along one axis,
    made by ``F.interpolate`` itself (resizing the identity along that axis only), in float64."""
    identity = torch.eye(low_res, dtype=torch.float64)[None, None]
    full = F.interpolate(identity, (image_size, low_res), mode="bilinear", align_corners=False)
    half = F.interpolate(full, (image_size // 2, low_res), mode="bilinear", align_corners=False)
    return half[0, 0].to(device=device, dtype=torch.float32)


def valid_region(frame: torch.Tensor, input_size: Tuple[int, int]) -> torch.Tensor:
    """The image's part (..., ceil(h/2), ceil(w/2)) of a half-resolution padded frame (..., S/2, S/2).

    The resized image occupies rows [:h] and columns [:w] of the S x S input, so rows
    [:ceil(h/2)] and columns [:ceil(w/2)] of the half-resolution frame (the last kept row or
    column is half padding when h or w is odd).
    """
    return frame[..., : math.ceil(input_size[0] / 2), : math.ceil(input_size[1] / 2)]


def padded_frame_to_original(
    logits: torch.Tensor,
    input_size: Tuple[int, int],
    original_size: Tuple[int, int],
    image_size: int,
) -> torch.Tensor:
    """Padded-frame logits (B, 1, S/2, S/2) -> logits on the original image (B, 1, H, W).

    The image's region of the frame (:func:`valid_region`) is resized bilinearly to H x W.
    """
    half = image_size // 2
    if logits.shape[-2:] != (half, half):
        raise ValueError(f"logits: expected a padded frame {half}x{half}, got {tuple(logits.shape)}")
    return F.interpolate(valid_region(logits, input_size), tuple(original_size), mode="bilinear", align_corners=False)


def release_gt_frame(mask: np.ndarray, image_size: int) -> np.ndarray:
    """A GT mask (H, W) -> bool (S/2, S/2) as the release builds it for evaluation and training.

    The release (datasets/transforms.py SAMMaskResize, then datasets/dataset.py) turns the 0/1 mask
    into a float32 PIL image (mode "F": torchvision 0.16's ``to_pil_image`` keeps float32 arrays
    unscaled), resizes it to ResizeLongestSide's (h, w) with PIL's bilinear filter and keeps every
    pixel > 0 (so the edges grow by up to the filter's reach), pads it with zeros to S x S
    (bottom and right), and resizes that to S/2 x S/2 with torch's legacy "nearest" (source pixel
    floor(2 i): the even rows and columns).
    """
    height, width = ResizeLongestSide.get_preprocess_shape(mask.shape[0], mask.shape[1], image_size)
    image = Image.fromarray(np.asarray(mask, dtype=bool).astype(np.float32))  # float32 -> mode "F"
    resized = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR)) > 0
    padded = np.zeros((image_size, image_size), dtype=bool)
    padded[:height, :width] = resized
    return padded[::2, ::2]


def mask_to_padded_frame(mask: np.ndarray, image_size: int) -> torch.Tensor:
    """Ground-truth mask (H, W) -> 0/1 float (S/2, S/2) in the frame of :func:`upscale_to_padded_frame`.

    The mask is resized to the image's input size (ResizeLongestSide's shape) by nearest
    neighbour with pixel-centre sampling ("nearest-exact", no half-pixel shift, unlike "nearest"),
    padded with zeros to S x S, and downsampled by 2 with the same rule (which keeps the odd
    rows and columns: output pixel i samples input pixel 2i + 1).
    """
    if not isinstance(mask, np.ndarray) or mask.ndim != 2:
        found = mask.shape if isinstance(mask, np.ndarray) else type(mask).__name__
        raise ValueError(f"mask: expected a 2-D array (H, W), got {found}")
    h, w = ResizeLongestSide.get_preprocess_shape(mask.shape[0], mask.shape[1], image_size)
    mask_tensor = torch.from_numpy(mask.astype(bool)).float()[None, None]
    resized = F.interpolate(mask_tensor, (h, w), mode="nearest-exact")
    padded = F.pad(resized, (0, image_size - w, 0, image_size - h))
    half = image_size // 2
    return F.interpolate(padded, (half, half), mode="nearest-exact")[0, 0]


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
        embedding_size = image_embeddings.shape[-2:]
        return hypernetwork_masks(self.mask_decoder, token_out, image_out, embedding_size, range(1))  # the single-mask output


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
            transformer leaves them; image_out: (B, h w, C), its image tokens (a mask is a hypernetwork
            output of a mask token dotted with their upscaling: :func:`hypernetwork_masks`).

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
    return token_out, image_out


def hypernetwork_masks(
    mask_decoder: MaskDecoder, token_out: torch.Tensor, image_out: torch.Tensor, embedding_size: Tuple[int, int], outputs: range
) -> torch.Tensor:
    """SAM's mask logits of the mask tokens ``outputs`` (0: the single-mask output; 1-3: the three
    multimask outputs), from :func:`decode_prompt_sets`' results: each token's hypernetwork output
    dotted with the image tokens after ``output_upscaling``. SAM computes all four and keeps some;
    only these run here.

    ``output_upscaling`` (two 2x2 stride-2 transposed convolutions with a channel layer norm and
    activations between) maps every image token to its own 4x4 block of output pixels, and every step
    of it, the mask product too, is per position: it runs here on the tokens as they come (B, h w, C),
    each transposed convolution as one matrix product onto the 2x2 sub-pixels, and only the logits,
    C / 8 times smaller than the upscaled features, are put in image order at the end. Equal to the
    stock module followed by the product (tested); on a CPU, oneDNN's transposed convolutions and
    SAM's elementwise ``LayerNorm2d`` cost several times these products, and the stock path's
    channels-last activations made their backward mix memory layouts.

    Args:
        token_out: (B, 1 + M + T, C), the transformer's tokens.
        image_out: (B, h w, C), the transformer's image tokens, row-major over (h, w).
        embedding_size: (h, w).

    Returns:
        (B, len(outputs), 4h, 4w) logits.
    """
    first, norm, first_act, second, second_act = _stock_output_upscaling(mask_decoder)
    sub_pixels = _transposed_conv_2x2(image_out, first)  # (B, h w, 4, C / 4), sub-pixel (i, j) of each token
    sub_pixels = first_act(F.layer_norm(sub_pixels, norm.weight.shape, norm.weight, norm.bias, norm.eps))
    sub_pixels = second_act(_transposed_conv_2x2(sub_pixels, second))  # (B, h w, 4, 4, C / 8): (i, j), then (k, l)
    # Token 0 is the IoU token; mask token i is token 1 + i.
    weights = torch.stack([mask_decoder.output_hypernetworks_mlps[i](token_out[:, 1 + i]) for i in outputs], dim=2)
    logits = sub_pixels.flatten(1, 3) @ weights  # (B, h w 16, m)
    # Output pixel (4y + 2i + k, 4x + 2j + l) of token (y, x), sub-pixels (i, j) and (k, l).
    h, w = embedding_size
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
