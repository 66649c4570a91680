"""Typed model configuration, validated so that a wrong key or value names itself.

The Hydra group ``configs/model/`` holds YAML files with exactly these fields. They are merged
into :class:`ModelConfig` through OmegaConf's structured configs, which rejects unknown keys and
wrong types; :func:`model_config_from` turns those failures into :class:`ConfigError`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .backbones.sam_frames import MASK_TARGETS
from .errors import ConfigError, first_line


@dataclass
class AdapterConfig:
    """Switches and sizes of the two adapters (each switch removes its modules).

    The switches off are the paper's ablations as the release's ablation models compute them:
    ``visual=False`` (w/o VAD) still projects the normalised CLIP patch tokens to ``dim`` (the
    release's ``clip_img_proj``) but without similarity weighting, verification or LayerNorm;
    ``gaussian=False`` (w/o Gaussian) keeps the verification but scores a patch by the raw cosine;
    ``linguistic=False`` (w/o LAD) uses the L2-normalised CLIP sentence embedding as the phrase.
    """

    visual: bool = True  # VAD; off: the paper's "w/o VAD" (see above)
    # VAD's verification (text attention, projections, score); off (not a paper ablation): the
    # LayerNorm'd image queries go to the fusion unscored.
    verification: bool = True
    gaussian: bool = True  # the verification score is the Gaussian of the cosine; off: the paper's "w/o Gaussian"
    linguistic: bool = True  # LAD; off: the paper's "w/o LAD" (see above)
    # Width of both adapters, the word projection and the fusion input: 512 for both released
    # models (on ViT-L/14@336 the 768-wide CLIP outputs are projected to it). None: CLIP's
    # embedding width (checkpoints of ours written before this field).
    dim: Optional[int] = None
    num_heads: int = 8
    mlp_layers: int = 3
    text_attention_dropout: float = 0.1  # on VAD's image-to-text attention weights, as the release (training only)


@dataclass
class PromptGeneratorConfig:
    mode: str = "encoder"  # "encoder" (released) or "decoder" (ablation)
    num_prompt_tokens: int = 128
    depth: int = 6
    num_heads: int = 8
    ffn_dim: int = 2048
    dropout: float = 0.0
    # Initial values of the position embeddings of the N patch tokens: "random" (nn.Embedding's
    # N(0, 1), as the release), "sincos" (2-D sine-cosine codes of the patch grid, ordered in x and
    # y from the first step) or "sam_click" (SAM's prompt token for a positive click on each patch's
    # centre). Training choice only: every checkpoint overwrites them.
    position_init: str = "random"
    # Add the patch position embeddings to the multimodal tokens (the attention values) too, not
    # only to queries and keys as the release does, so the prompt tokens can tell SAM *where*.
    # Changes the function: it must match the checkpoint (False for the released models).
    positions_in_values: bool = False


@dataclass
class ModelConfig:
    """Everything needed to build an SSP-SAM model.

    ``clip_arch`` is "ViT-B-16", "ViT-L-14-336" or "custom" (then ``clip_custom`` gives the sizes);
    ``sam_variant`` is "vit_b", "vit_l", "vit_h" or "custom" (then ``sam_custom``). The weight files
    are given by path. A weight file that is not given is an error when the weights cannot come
    from anywhere else (a checkpoint of ours that carries the encoders, a release file that carries
    SAM's image encoder): random CLIP and SAM weights give meaningless masks, so they are built only
    with ``random_encoders=True`` (tests, benchmarks).
    """

    name: str = "ssp_sam_224"
    clip_arch: str = "ViT-B-16"
    clip_checkpoint: Optional[str] = None
    clip_custom: Optional[dict] = None
    surgery_blocks: int = 6
    sam_variant: str = "vit_h"
    sam_checkpoint: Optional[str] = None
    sam_custom: Optional[dict] = None
    adapters: AdapterConfig = field(default_factory=AdapterConfig)
    prompt_generator: PromptGeneratorConfig = field(default_factory=PromptGeneratorConfig)
    append_period: bool = True  # the text fed to CLIP is "{expression}."
    # Train CLIP's text tower with the rest (not the token embedding; backbones/clip.py, FINETUNED_TEXT_PARAMETERS)
    # at train.text_encoder_lr. Not the release (its CLIP is frozen): for a text tower blind to words the task
    # needs (the ShapeWorld CLIP's "on the left" / "on the right": one sentence embedding, docs/shapeworld_model.md).
    finetune_text_encoder: bool = False
    # Train CLIP's last N vision blocks (N >= surgery_blocks), its ln_post and visual projection with the rest at
    # train.image_encoder_lr; 0: the image tower is frozen (the release). The frozen blocks' output is what the
    # image-token cache keeps (ssp_sam/feature_cache.py), so the cache still serves.
    finetune_image_blocks: int = 0
    release_quirks: bool = False  # switched on by the loader of released checkpoints
    no_target_pixels: int = 50  # a mask with fewer pixels in the padded SAM frame means "no target"
    # How training put GT masks into SAM's padded frame (ssp_sam/backbones/sam_frames.py, MASK_TARGETS):
    # "release" (its processing), "nearest" (frame pixel i = image pixel 2i + 1) or "area" (the fraction
    # of each frame pixel covered). It fixes where the trained model draws its masks, so predictions
    # are mapped back to the image by the same rule.
    mask_target: str = "release"
    random_encoders: bool = False  # build CLIP/SAM with random weights where no weight file is given (tests, benchmarks)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# The two released models, for loading their checkpoints without Hydra (configs/model/*.yaml
# holds the same settings for the command line).
RELEASE_PRESETS: dict[str, dict[str, Any]] = {
    "ssp_sam_224": {"name": "ssp_sam_224", "clip_arch": "ViT-B-16", "sam_variant": "vit_h", "adapters": {"dim": 512}},
    "ssp_sam_336": {"name": "ssp_sam_336", "clip_arch": "ViT-L-14-336", "sam_variant": "vit_h", "adapters": {"dim": 512}},
}


def model_overrides_added(argv: Sequence[str]) -> list[str]:
    """``argv`` with every ``model.<key>=value`` made ``++model.<key>=value`` (scripts/eval.py, predict.py).

    Their configs name no model (a checkpoint of ours carries its config, a release file's preset is told by
    its shapes), so without ``model=<preset>`` Hydra's struct mode refuses ``model.no_target_pixels=3`` as an
    unknown key; ``++`` adds or replaces it either way, so one setting is given as the README writes it. The
    keys are checked against :class:`ModelConfig` when the model loads.
    """
    return [f"++{argument}" if argument.startswith("model.") else argument for argument in argv]


def model_config_from(source: Mapping | DictConfig | ModelConfig | None = None, **overrides: Any) -> ModelConfig:
    """Validate ``source`` (a mapping, DictConfig or ModelConfig) plus ``overrides`` into a ModelConfig.

    Raises:
        ConfigError: naming the unknown key or the key with a wrong type.
    """
    config = merge_typed(ModelConfig, source, overrides, "model config")
    _check(config)
    return config


def merge_typed(schema: type, source: Any, overrides: Mapping[str, Any], label: str) -> Any:
    """``source`` and ``overrides`` merged into the dataclass ``schema`` through OmegaConf.

    Raises:
        ConfigError: "<label>: invalid key '<key>': <why>" for an unknown key or a wrong type.
    """
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), source if source is not None else {}, overrides)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
        # OmegaConf's message goes on with "full_key: ..." and "object_type=..." lines: the key is named already.
        raise ConfigError(f"{label}: invalid key {key!r}: {first_line(exc)}") from None


def _check(config: ModelConfig) -> None:
    if config.clip_arch not in ("ViT-B-16", "ViT-L-14-336", "custom"):
        raise ConfigError(f"model.clip_arch: unknown CLIP architecture {config.clip_arch!r} (ViT-B-16, ViT-L-14-336, custom)")
    if config.sam_variant not in ("vit_b", "vit_l", "vit_h", "custom"):
        raise ConfigError(f"model.sam_variant: unknown SAM variant {config.sam_variant!r} (vit_b, vit_l, vit_h, custom)")
    if config.clip_arch == "custom" and not config.clip_custom:
        raise ConfigError("model.clip_custom: required when model.clip_arch=custom")
    if config.sam_variant == "custom" and not config.sam_custom:
        raise ConfigError("model.sam_custom: required when model.sam_variant=custom")
    if config.prompt_generator.mode not in ("encoder", "decoder"):
        raise ConfigError(f"model.prompt_generator.mode: must be encoder or decoder, got {config.prompt_generator.mode!r}")
    if config.prompt_generator.position_init not in ("random", "sincos", "sam_click"):
        raise ConfigError(
            "model.prompt_generator.position_init: must be random, sincos or sam_click, "
            f"got {config.prompt_generator.position_init!r}"
        )
    for key, value in (
        ("model.prompt_generator.num_prompt_tokens", config.prompt_generator.num_prompt_tokens),
        ("model.prompt_generator.depth", config.prompt_generator.depth),
        ("model.adapters.mlp_layers", config.adapters.mlp_layers),
        ("model.adapters.dim", 1 if config.adapters.dim is None else config.adapters.dim),
        # Fewer mask pixels than this mean "no target": below 1 no mask could say so (GRES N-acc would be 0 by
        # construction, and the release protocol's counts fail after a whole training epoch).
        ("model.no_target_pixels", config.no_target_pixels),
    ):
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    if not 0.0 <= config.adapters.text_attention_dropout < 1.0:
        raise ConfigError(f"model.adapters.text_attention_dropout: must lie in [0, 1), got {config.adapters.text_attention_dropout}")
    if config.mask_target not in MASK_TARGETS:
        raise ConfigError(f"model.mask_target: must be one of {', '.join(MASK_TARGETS)}, got {config.mask_target!r}")
    if config.surgery_blocks < 0:
        raise ConfigError(f"model.surgery_blocks: must be >= 0, got {config.surgery_blocks}")
    if config.finetune_image_blocks and config.finetune_image_blocks < config.surgery_blocks:
        raise ConfigError(
            f"model.finetune_image_blocks: must be 0 or at least model.surgery_blocks ({config.surgery_blocks}), "
            f"got {config.finetune_image_blocks}"
        )
