"""Typed configuration of the OVSS models (CAT-Seg, CAT-Seg + SAM vote, SAM-MI), validated key by key.

The Hydra group ``configs/ovss_model/`` holds YAML files with exactly these fields; they are merged into
:class:`OVSSModelConfig` through OmegaConf's structured configs (unknown keys and wrong types are refused)
and :func:`ovss_config_from` turns every failure into one :class:`ConfigError` line naming the key.

Defaults are CAT-Seg's ViT-B/16 release configuration (``configs/vitb_384.yaml`` of KU-CVLAB/CAT-Seg).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, List, Mapping, Optional

from omegaconf import DictConfig

from ..config import merge_typed
from ..errors import ConfigError

VARIANTS = ("catseg", "catseg_sam_vote", "sam_mi")
TEMPLATE_SETS = ("single", "imagenet80", "shapeworld")
DENSE_PATHS = ("catseg", "surgery")
IGNORE_RULES = ("negative", "excluded")
POINT_SOURCES = ("tspp", "grid")
SAMPLERS = ("class_peaks", "global_peaks")
CRITERIA = ("mean_cost", "majority_vote")
CONFIDENCE_RULES = ("none", "gated")


@dataclass
class CLIPConfig:
    """The CLIP of CAT-Seg: which one, at which resolution, which layers guide the decoder, what is trained."""

    arch: str = "ViT-B-16"  # ViT-B-16 | ViT-L-14-336 | custom (then `custom` gives the sizes, as configs/model/*)
    checkpoint: Optional[str] = None
    custom: Optional[dict] = None
    resolution: int = 384  # side CLIP runs at (ViT-B/16: 384 -> 24x24 tokens; ViT-L/14: 336 -> 24x24)
    guidance_layers: List[int] = field(default_factory=lambda: [3, 7])  # ViT blocks whose outputs guide the decoder
    templates: str = "single"  # single ("A photo of a {} in the scene") | imagenet80 (CLIP's 80 ImageNet templates) | shapeworld ("the {}.")
    # Where the dense patch features come from. catseg: CAT-Seg's last block (each patch becomes
    # out_proj(v(patch)) + the CLS token's input; made for OpenAI's CLIPs). surgery: CLIP Surgery's
    # value-value stream over the last `surgery_blocks` blocks, the way the ShapeWorld CLIPs are
    # pretrained and SSP-SAM reads them (zero-shot pixel accuracy on ShapeWorld-OVSS: 1 % via catseg,
    # 17-21 % via surgery; docs/ovss_models.md).
    dense: str = "catseg"
    surgery_blocks: int = 2
    finetune_qv: bool = True  # train the attention q and v projections of both towers (everything else frozen)
    # Train both towers' position embeddings too (the paper). CAT-Seg's released code selects them with a
    # name filter that never matches ("position" inside names containing "transformer"), so it trains
    # only q/v; false reproduces that.
    finetune_positions: bool = True


@dataclass
class AggregatorConfig:
    """Cost embedding, aggregation layers and upsampling decoder (CAT-Seg's `Aggregator`)."""

    hidden_dim: int = 128
    num_layers: int = 2
    num_heads: int = 4
    window_size: int = 12  # Swin window of the spatial aggregation (on the 24x24 cost maps: 2x2 windows)
    pooling: List[int] = field(default_factory=lambda: [2, 2])  # average pooling inside class aggregation
    # ... in eval mode: CAT-Seg trains with [2, 2] and evaluates with [1, 1] (its eval.sh sets
    # POOLING_SIZES "[1,1]"); null: the training pooling (the ShapeWorld models). No weights depend on it.
    test_pooling: Optional[List[int]] = None
    text_guidance_dim: int = 128
    appearance_guidance_dim: int = 128
    decoder_dims: List[int] = field(default_factory=lambda: [64, 32])
    decoder_guidance_dims: List[int] = field(default_factory=lambda: [256, 128])  # ViT features after the x2 / x4 transposed convs
    decoder_guidance_proj_dims: List[int] = field(default_factory=lambda: [32, 16])
    max_classes: int = 256  # at most this many classes aggregated (top by max CLIP score); the rest get `low_score`
    pad_classes: bool = True  # class aggregation always sees max_classes tokens (learned padding), as CAT-Seg
    low_score: float = -100.0  # logit of the classes not aggregated
    ignore_pixels: str = "negative"  # negative: ignore-label pixels are negatives of every class (CAT-Seg) | excluded


@dataclass
class SAMConfig:
    variant: str = "vit_b"  # vit_b | vit_l | vit_h | custom
    checkpoint: Optional[str] = None
    custom: Optional[dict] = None


@dataclass
class ProposalConfig:
    """Point prompts -> SAM mask proposals (SamAutomaticMaskGenerator's filters, without its crops)."""

    grid_side: int = 32  # the dense grid: grid_side^2 points
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    # SAM's three masks per point (AMG's choice; the real SAMs train all three) or its single-mask output
    # only: a SAM trained with single-mask output alone (the ShapeWorld SAM) has three untrained tokens.
    multimask_output: bool = True


@dataclass
class TSPPConfig:
    budget: int = 40  # at most this many points per image
    sampler: str = "class_peaks"  # class_peaks: every class's best peak first | global_peaks: peaks of the max over classes
    nms_kernel: int = 3  # a peak is the maximum of its nms_kernel x nms_kernel neighbourhood
    min_probability: float = 0.05  # peaks below this are not prompted
    # At inference (eval, predict) instead of budget / min_probability; null: the same. Training pays for
    # every prompt at every step, inference once per image, so the two may differ (as detectron2's RPN
    # keeps separate train and test proposal counts).
    test_budget: Optional[int] = None
    test_min_probability: Optional[float] = None
    upsample: int = 2  # the point map is upsampled this much (bilinear) before peak picking (finer points)
    loss_weight: float = 1.0
    # The paper does not say whether TSPP's loss shapes the cost embedding it reads. true: TSPP learns from a
    # detached copy (CAT-Seg's features are trained by the segmentation loss alone); false: shared (the default).
    detach_input: bool = False

    def at_inference(self) -> "TSPPConfig":
        """The settings sampling uses at inference: ``test_budget`` / ``test_min_probability`` where given."""
        budget = self.budget if self.test_budget is None else self.test_budget
        threshold = self.min_probability if self.test_min_probability is None else self.test_min_probability
        return replace(self, budget=budget, min_probability=threshold)


@dataclass
class SMAggConfig:
    criterion: str = "mean_cost"  # mean_cost: class of highest mean cost inside the mask | majority_vote: of the per-pixel argmax
    # none: binary class masks (the paper's union) | gated: each proposal enters its class mask weighted by
    # the confidence of its assignment (ssp_sam/ovss/sam_mi/smagg.py), so DMI gets less of an unsure one
    confidence: str = "none"
    temperature: float = 0.01  # gated mean_cost: softmax over the classes' mean costs (cosines) at this temperature


@dataclass
class DMIConfig:
    low_frequency: bool = True  # mask pooling + cross-attention between masks, into every aggregation layer
    high_frequency: bool = True  # masks and their edges at the decoder's resolutions, into its convolutions
    num_heads: int = 4


@dataclass
class OVSSModelConfig:
    """Everything needed to build one of the three OVSS models (``variant``)."""

    name: str = "catseg_vitb16_384"
    variant: str = "catseg"  # catseg | catseg_sam_vote | sam_mi
    points: str = "tspp"  # SAM-MI's prompts: tspp | grid (the dense-grid ablation); catseg_sam_vote always uses the grid
    image_size: int = 384  # side of the square input crops (CLIP resizes them to clip.resolution)
    random_encoders: bool = False  # build CLIP / SAM with random weights when no file is given (tests, benchmarks)
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    aggregator: AggregatorConfig = field(default_factory=AggregatorConfig)
    sam: SAMConfig = field(default_factory=SAMConfig)
    proposals: ProposalConfig = field(default_factory=ProposalConfig)
    tspp: TSPPConfig = field(default_factory=TSPPConfig)
    smagg: SMAggConfig = field(default_factory=SMAggConfig)
    dmi: DMIConfig = field(default_factory=DMIConfig)

    @property
    def uses_sam(self) -> bool:
        return self.variant != "catseg"

    @property
    def uses_tspp(self) -> bool:
        return self.variant == "sam_mi" and self.points == "tspp"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ovss_config_from(source: Mapping | DictConfig | OVSSModelConfig | None = None, **overrides: Any) -> OVSSModelConfig:
    """Validate ``source`` plus ``overrides`` into an OVSSModelConfig.

    Raises:
        ConfigError: one line naming the unknown key, the key of a wrong type or the impossible value.
    """
    if isinstance(source, (dict, DictConfig)) and "defaults" in source:  # a YAML read without Hydra
        source = {key: value for key, value in source.items() if key != "defaults"}
    config: OVSSModelConfig = merge_typed(OVSSModelConfig, source, overrides, "ovss_model")
    _check(config)
    return config


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"ovss_model.{key}: must be one of {', '.join(allowed)}, got {value!r}")


def _check(config: OVSSModelConfig) -> None:
    _one_of("variant", config.variant, VARIANTS)
    _one_of("points", config.points, POINT_SOURCES)
    _one_of("clip.arch", config.clip.arch, ("ViT-B-16", "ViT-L-14-336", "custom"))
    _one_of("clip.templates", config.clip.templates, TEMPLATE_SETS)
    _one_of("clip.dense", config.clip.dense, DENSE_PATHS)
    _one_of("sam.variant", config.sam.variant, ("vit_b", "vit_l", "vit_h", "custom"))
    _one_of("aggregator.ignore_pixels", config.aggregator.ignore_pixels, IGNORE_RULES)
    _one_of("tspp.sampler", config.tspp.sampler, SAMPLERS)
    _one_of("smagg.criterion", config.smagg.criterion, CRITERIA)
    _one_of("smagg.confidence", config.smagg.confidence, CONFIDENCE_RULES)
    if not config.smagg.temperature > 0:
        raise ConfigError(f"ovss_model.smagg.temperature={config.smagg.temperature}: must be > 0")
    if config.clip.arch == "custom" and not config.clip.custom:
        raise ConfigError("ovss_model.clip.custom: required when ovss_model.clip.arch=custom")
    if config.sam.variant == "custom" and not config.sam.custom:
        raise ConfigError("ovss_model.sam.custom: required when ovss_model.sam.variant=custom")
    aggregator = config.aggregator
    positive = {
        "image_size": config.image_size,
        "clip.resolution": config.clip.resolution,
        "aggregator.hidden_dim": aggregator.hidden_dim,
        "aggregator.num_layers": aggregator.num_layers,
        "aggregator.window_size": aggregator.window_size,
        "aggregator.max_classes": aggregator.max_classes,
        "proposals.grid_side": config.proposals.grid_side,
        "proposals.points_per_batch": config.proposals.points_per_batch,
        "tspp.budget": config.tspp.budget,
        "tspp.test_budget": config.tspp.at_inference().budget,
        "tspp.nms_kernel": config.tspp.nms_kernel,
        "tspp.upsample": config.tspp.upsample,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"ovss_model.{key}: must be >= 1, got {value}")
    for key in ("min_probability", "test_min_probability"):
        value = getattr(config.tspp, key)
        if value is not None and not 0.0 <= value <= 1.0:
            raise ConfigError(f"ovss_model.tspp.{key}: a probability in [0, 1], got {value}")
    if config.tspp.nms_kernel % 2 == 0:
        raise ConfigError(f"ovss_model.tspp.nms_kernel: must be odd, got {config.tspp.nms_kernel}")
    if len(config.clip.guidance_layers) != 2 or len(aggregator.decoder_dims) != 2:
        raise ConfigError("ovss_model: clip.guidance_layers and aggregator.decoder_dims need two entries (two x2 decoder blocks)")
    if len(aggregator.decoder_guidance_dims) != 2 or len(aggregator.decoder_guidance_proj_dims) != 2:
        raise ConfigError("ovss_model.aggregator: decoder_guidance_dims and decoder_guidance_proj_dims need two entries")
    for key, pooling in (("pooling", aggregator.pooling), ("test_pooling", aggregator.test_pooling or [1, 1])):
        if len(pooling) != 2 or min(pooling) < 1:
            raise ConfigError(f"ovss_model.aggregator.{key}: needs two entries (h, w) >= 1, got {pooling}")
    if aggregator.hidden_dim % aggregator.num_heads:
        raise ConfigError(
            f"ovss_model.aggregator.hidden_dim: {aggregator.hidden_dim} is not a multiple of num_heads {aggregator.num_heads}"
        )
    if any(dim < 16 or dim % 16 for dim in aggregator.decoder_dims):
        raise ConfigError(f"ovss_model.aggregator.decoder_dims: multiples of 16 (GroupNorm of width/16 groups), got {aggregator.decoder_dims}")
