"""Typed configuration of an OVSS training run (``configs/train_ovss.yaml``), validated before any work.

As ``ssp_sam/engine/train_config.py`` does for SSP-SAM: the composed config is merged into
:class:`OVSSTrainRunConfig` through OmegaConf's structured configs (an unknown key or a wrong type is
refused), then ranges and choices are checked field by field, and every failure is one
:class:`ConfigError` line naming the key. ``ovss_model`` becomes an :class:`OVSSModelConfig`;
``ovss_dataset`` stays a mapping (the dataset registry checks it when it reads the data).

Defaults are CAT-Seg's recipe (``../shared/specs/sam-mi.md``; KU-CVLAB/CAT-Seg's COCO-Stuff configs and
``train_net.py``): 80k iterations of batch 4 on 384x384 crops, AdamW at 2e-4 with CLIP's trained
weights at 0.01x, detectron2's WarmupCosineLR without warm-up (to 0), no weight decay on norm layers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ...engine.config_fields import check_fields, choice, merge_config, number
from ...engine.precision import PRECISIONS
from ...errors import ConfigError
from ...outputs import check_output_dir
from ..model_config import ovss_config_from
from ..sliding_window import check_sliding_window, default_out_size

CROPS = ("random", "none")
SELECTION_METRICS = ("mIoU", "mIoU seen", "mIoU unseen", "hIoU", "fwIoU", "pAcc", "mACC")
ZERO_SHOT_METRICS = ("mIoU seen", "mIoU unseen", "hIoU")  # only of a split that names unseen classes
# What a training image's classes are scored against, for a class list with held-out (unseen) classes:
# seen: the unseen names are left out of training and any pixel of theirs is ignored (the inductive
# zero-shot protocol: a model meets an unseen name first at test time); all: every name of the list is a
# negative for each training pixel (transductive: the unseen names are known, their pixels not).
# The same for a class list without unseen classes.
VOCABULARIES = ("seen", "all")


@dataclass
class OVSSTrainSection:
    """``train:``, the recipe (configs/train_ovss.yaml says what each key does)."""

    split: str = "train2017"
    iterations: int = number(80_000, 1)
    batch_size: int = number(4, 1)  # global, split evenly across processes
    lr: float = number(2e-4, 0)
    clip_lr_multiplier: float = number(0.01, 0)  # CLIP's trained q/v and position embeddings (CAT-Seg's CLIP_MULTIPLIER)
    weight_decay: float = number(1e-4, 0)
    norm_weight_decay: float = number(0.0, 0)  # norm layers (detectron2's WEIGHT_DECAY_NORM)
    grad_clip: Optional[float] = number(0.01, 0, optional=True, above=True)  # L2 norm over the whole model; null: none
    warmup_iterations: int = number(0, 0)
    min_lr: float = number(0.0, 0)
    precision: str = choice("auto", PRECISIONS)
    workers: int = number(4, 0)
    # random: CAT-Seg's training crops (short side -> short_side, at most max_size long, a random
    # image_size square, horizontal flip); none: the whole image resized to image_size (no augmentation:
    # the cached SAM embedding is that of the model's input, ensure_cache's model_input_size).
    crop: str = choice("random", CROPS)
    short_side: int = number(384, 1)
    max_size: int = number(1333, 1)  # detectron2's INPUT.MAX_SIZE_TRAIN, which CAT-Seg's configs leave at its default
    flip: bool = True
    log_every: int = number(20, 1)  # steps between host syncs of the losses (logs, NaN check)
    save_every: int = number(5000, 1)  # iterations between last/ checkpoints (and at the end)
    max_minutes: Optional[float] = number(None, 0, optional=True, above=True)  # stop (state saved, exit 3) after this long
    save_encoders: bool = False  # embed the frozen CLIP and SAM in the checkpoints (self-contained small models)
    vocabulary: str = choice("seen", VOCABULARIES)  # see VOCABULARIES above


@dataclass
class OVSSValSection:
    """``val:``: evaluation during training, which picks ``best/``."""

    split: Optional[str] = None  # null: no validation (best/ is the last state)
    every: int = number(5000, 1)  # iterations between validations (and at the end)
    metric: str = choice("mIoU", SELECTION_METRICS)
    max_images: Optional[int] = number(None, 1, optional=True)  # the first n images of the split only


@dataclass
class OVSSEvalSection:
    """``eval:``: how images are predicted (training's validation and scripts/eval.py)."""

    sliding_window: bool = True  # CAT-Seg's: windows over the image resized to out_size, plus a global view
    window: Optional[int] = number(None, 1, optional=True)  # null: the model's input size (the only one the sliding window takes)
    overlap: float = number(0.333, 0)
    # null: window + stride, two windows a side (CAT-Seg's 640 for 384 at overlap 0.333), so that a changed window
    # never leaves it uncovered (sliding_window.default_out_size)
    out_size: Optional[int] = number(None, 1, optional=True)
    batch_size: int = number(8, 1)  # images per forward without the sliding window


@dataclass
class OVSSTrainRunConfig:
    name: str = "ovss"
    run_dir: str = "runs/ovss"
    resume: bool = False
    init_checkpoint: Optional[str] = None
    seed: int = 3407
    device: str = "auto"
    threads: Optional[int] = number(None, 1, optional=True)  # torch CPU threads; null: PyTorch's default
    cache_dir: Optional[str] = None  # SAM embedding cache (SAM-MI with train.crop=none / eval without sliding window)
    cache_batch_size: int = number(4, 1)
    train: OVSSTrainSection = field(default_factory=OVSSTrainSection)
    val: OVSSValSection = field(default_factory=OVSSValSection)
    eval: OVSSEvalSection = field(default_factory=OVSSEvalSection)
    ovss_model: Any = None  # an OVSSModelConfig once validated
    ovss_dataset: Any = None  # the registry's mapping, unresolved (see dataset_config)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def dataset_config(self, split: str) -> dict[str, Any]:
        """The dataset config of ``split``, interpolations resolved (folders that name ``${.split}`` follow it)."""
        try:
            return OmegaConf.to_container(OmegaConf.create({**self.ovss_dataset, "split": split}), resolve=True)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"ovss_dataset: cannot be resolved ({str(exc).splitlines()[0]})") from None


def ovss_train_config_from(cfg: Mapping | DictConfig) -> OVSSTrainRunConfig:
    """Validate a composed ``configs/train_ovss.yaml`` into an :class:`OVSSTrainRunConfig`.

    Raises:
        ConfigError: one line naming the first unusable key.
    """
    raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    # The dataset section keeps its interpolations: its folders name ${.split}, set per split by the trainer.
    dataset = cfg.get("ovss_dataset") or {}
    dataset = OmegaConf.to_container(dataset, resolve=False) if isinstance(dataset, DictConfig) else dict(dataset)
    sections = {k: v for k, v in raw.items() if k not in ("ovss_model", "ovss_dataset")}
    config = merge_config(OVSSTrainRunConfig, sections, raw, "an OVSS training option (configs/train_ovss.yaml lists them)")
    for prefix, section in (("", config), ("train.", config.train), ("val.", config.val), ("eval.", config.eval)):
        check_fields(prefix, section, raw)
    check_output_dir(config.run_dir, "run_dir")
    config.ovss_model = ovss_config_from(raw.get("ovss_model") or {})
    config.ovss_dataset = dataset
    if config.ovss_model.image_size > config.train.short_side and config.train.crop == "random":
        raise ConfigError(
            f"train.short_side={config.train.short_side}: smaller than the crops (ovss_model.image_size={config.ovss_model.image_size})"
        )
    config.eval = settled_eval_section(config.eval, config.ovss_model.image_size)
    return config


def settled_eval_section(section: OVSSEvalSection, image_size: int) -> OVSSEvalSection:
    """``section`` with its defaults filled in for a model of input side ``image_size`` (window null: ``image_size``;
    out_size null: :func:`~ssp_sam.ovss.sliding_window.default_out_size`), its sliding-window geometry checked.

    Raises:
        ConfigError: overlap not below 1; with the sliding window, a window other than the model's input or
            crops that do not cover out_size (:func:`~ssp_sam.ovss.sliding_window.check_sliding_window`).
    """
    if section.overlap >= 1:
        raise ConfigError(f"eval.overlap={section.overlap}: must be < 1")
    window = image_size if section.window is None else section.window
    out_size = default_out_size(window, section.overlap) if section.out_size is None else section.out_size
    if section.sliding_window:
        if window != image_size:
            raise ConfigError(f"eval.window={window}: the windows are the model's input (ovss_model.image_size={image_size})")
        check_sliding_window(window, section.overlap, out_size)
    return replace(section, window=window, out_size=out_size)
