"""SAM's weights and modules as SSP-SAM builds them: the official variants and small custom ones.

SSP-SAM feeds learned prompt tokens to stock ``segment_anything`` modules (spec "SAM mask decoder"),
so this module builds those modules rather than re-implementing them (as segment_anything's
``build_sam.py`` does): :func:`build_sam` builds only the parts a caller needs, loads them safely
(``weights_only=True``) and validates the file key by key (the embedding cache is keyed to a weight
file by its sha256, :func:`ssp_sam.engine.caching.remembered_fingerprint`). The image transform and the frames a mask lives in are in
:mod:`ssp_sam.backbones.sam_frames`; the batched mask decoding in :mod:`ssp_sam.backbones.sam_decoder`.

Parts not requested from :func:`build_sam` are ``None`` on the returned ``Sam``; ``Sam.preprocess``
and ``Sam.postprocess_masks`` need ``image_encoder`` (for ``img_size``), the functions here do not.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Mapping, Optional, Sequence

import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from segment_anything.modeling.image_encoder import PatchEmbed
from torch import nn

from ..attention import fuse_image_encoder_attention, fuse_two_way_attention
from ..errors import CheckpointError, ConfigError
from ..state_dicts import mismatch_report
from ..weight_files import describe_weights, read_weights, require_finite
from .sam_frames import PIXEL_MEAN, PIXEL_STD

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
