"""Typed configuration of a training run, validated once before any work, errors naming the key.

``configs/train.yaml`` (with its experiment, model and dataset groups) composes to a DictConfig;
:func:`train_run_config_from` merges it into :class:`TrainRunConfig` through OmegaConf's structured
configs, as ``ssp_sam/config.py`` does for the model: an unknown key or a value of the wrong type
fails the merge and is reported by its key. Numbers are then checked against their range
(``train.batch_size=0: must be an integer >= 1``), names against their choices, and the run
directory for being writable, so that a mistyped option never fails deep inside PyTorch after the
data has been read and the embedding cache filled. The model section becomes a
:class:`~ssp_sam.config.ModelConfig`; the dataset section stays a mapping (the dataset registry
checks it when it reads the data).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Mapping, Optional

from omegaconf import DictConfig, OmegaConf

from ..config import model_config_from
from ..data.training import check_expression_weights
from ..errors import ConfigError
from ..outputs import check_output_dir
from .config_fields import MISSING, check_fields, choice, lookup, merge_config, number
from .optim import SCHEDULES
from .precision import PRECISIONS
from .protocols import PROTOCOLS

STAGES = ("rec", "res")
REQUIRED = "<required>"  # an experiment's value for a key the command line must give (OmegaConf's "???" does not override)


@dataclass
class TrainSection:
    """``train:``: the recipe (see configs/train.yaml for what each key does)."""

    stage: str = choice("res", STAGES)
    split: str = "train"
    epochs: int = number(80, 1)
    batch_size: int = number(64, 1)  # global, split evenly across processes
    lr: float = number(1e-4, 0)
    decoder_lr: float = number(1e-5, 0)
    text_encoder_lr: float = number(1e-5, 0)  # CLIP's text tower, with model.finetune_text_encoder=true
    image_encoder_lr: float = number(1e-5, 0)  # CLIP's last vision blocks, with model.finetune_image_blocks > 0
    min_lr: float = number(1e-6, 0)
    weight_decay: float = number(1e-4, 0)
    grad_clip: Optional[float] = number(0.1, 0, optional=True, above=True)  # null: no clipping
    schedule: str = choice("per_epoch", SCHEDULES)
    warmup_epochs: int = number(5, 0)
    decoder_freeze_epochs: int = number(20, 0)
    precision: str = choice("auto", PRECISIONS)
    workers: int = number(4, 0)  # data-loader processes, forked once and kept for the whole run
    augment: bool = True
    # 0: the release's uniform random letterbox offsets; K: one of K fixed offsets per image, so the
    # frozen CLIP image tokens repeat and can be cached (image_cache_gb); a deviation from the release.
    clip_placements: int = number(0, 0)
    expression_weights: Optional[Dict[str, float]] = None
    expression_weight_key: str = "kind"
    # {value: weight}: an epoch draws its referents (with replacement) by the mean weight of their
    # sentences' expression_weight_key values instead of visiting each once (the release); null: off.
    referent_weights: Optional[Dict[str, float]] = None
    log_every: int = number(10, 1)  # steps between host syncs of the losses (logs, NaN check)
    # CLIP text features kept per sentence in memory up to this size (feature_cache.py); 0: off, the
    # default, because a cached sentence keeps the rounding of the batch it was first computed in
    # (~1e-7 relative), so a resumed run would no longer replay an uninterrupted one bit for bit.
    text_cache_gb: float = number(0.0, 0)
    # CLIP image tokens kept per CLIP input up to this size (needs augment=false or clip_placements > 0).
    image_cache_gb: float = number(0.0, 0)
    max_steps_per_epoch: Optional[int] = number(None, 1, optional=True)
    # Stage stop: before an epoch that would end past this much wall time (this invocation), judged by
    # the longest epoch so far (at least one epoch runs), the run stops with last/ saved
    # (scripts/train.py exits with status 3) and resume=true continues it.
    max_minutes: Optional[float] = number(None, 0, optional=True, above=True)
    save_encoders: bool = False


@dataclass
class ValSection:
    """``val:``: validation after an epoch, which picks ``best/``."""

    split: Optional[str] = "val"  # null: no validation (the last epoch is also "best")
    protocol: str = choice("ssp_sam_release", PROTOCOLS)
    every: int = number(1, 1)  # validate after every n-th epoch (and after the last)
    max_batch: int = number(32, 1)
    overlays: int = number(4, 0)


@dataclass
class TestSection:
    """``test:``: the best checkpoint evaluated at the end."""

    split: Optional[str] = None


@dataclass
class TrainRunConfig:
    """Everything a training run reads; ``model`` and ``dataset`` are filled by :func:`train_run_config_from`."""

    name: str = "run"
    run_dir: str = "runs/run"
    resume: bool = False
    init_checkpoint: Optional[str] = None
    seed: int = 3407
    device: str = "auto"
    cache_dir: str = "cache"
    cache_batch_size: int = number(4, 1)
    train: TrainSection = field(default_factory=TrainSection)
    val: ValSection = field(default_factory=ValSection)
    test: TestSection = field(default_factory=TestSection)
    model: Any = None  # a ModelConfig once validated
    dataset: Any = None  # the dataset registry's mapping

    def to_dict(self) -> dict[str, Any]:
        """Plain containers, as stored with every checkpoint (``run``)."""
        return asdict(self)


# Keys that no longer exist -> what to write instead.
RENAMED = {
    "train.amp": "train.amp: replaced by train.precision=auto|fp32|bf16|fp16 (amp=false is precision=fp32; "
    "amp=auto was bf16/fp16 on CUDA and fp32 on a CPU; precision=auto also takes bf16 on native-bf16 CPUs)",
    "train.mask_target": "train.mask_target: now model.mask_target (where the trained model draws its masks in "
    "SAM's padded frame, which prediction needs to map them back, so the checkpoint keeps it)",
}


def train_run_config_from(cfg: Mapping | DictConfig) -> TrainRunConfig:
    """Validate a composed training config (configs/train.yaml) into a :class:`TrainRunConfig`.

    Raises:
        ConfigError: one line naming the first unusable key (unknown, wrong type, out of range,
            not one of its choices, a run_dir that cannot be written, a combination the stage
            cannot run).
    """
    raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    if raw.get("init_checkpoint") == REQUIRED:
        model_name = str((raw.get("model") or {}).get("name", ""))
        rec_run = f"runs/rec_pretrain_{model_name[-3:]}" if model_name in ("ssp_sam_224", "ssp_sam_336") else "runs/<REC pretraining run>"
        raise ConfigError(
            "init_checkpoint: this experiment must say where stage 2 starts: the REC pretraining's last/ "
            f"(init_checkpoint={rec_run}/last, as the release starts from its checkpoint0020) or "
            "init_checkpoint=null (CLIP's and SAM's weights alone)"
        )
    for key, message in RENAMED.items():
        if lookup(raw, key) is not MISSING:
            raise ConfigError(message)
    sections = {k: v for k, v in raw.items() if k not in ("model", "dataset")}
    config = merge_config(TrainRunConfig, sections, raw, "a training option (configs/train.yaml lists them)")
    for prefix, section in (("", config), ("train.", config.train), ("val.", config.val)):
        check_fields(prefix, section, raw)
    if config.train.expression_weights is not None:
        check_expression_weights(config.train.expression_weights)
    if config.train.referent_weights is not None:
        check_expression_weights(config.train.referent_weights, "train.referent_weights")
    if config.train.stage == "rec" and config.train.save_encoders:
        raise ConfigError("train.save_encoders=true: the REC stage (train.stage=rec) builds no SAM image encoder to save")
    if config.train.image_cache_gb > 0 and config.train.augment and not config.train.clip_placements:
        raise ConfigError(
            "train.image_cache_gb: CLIP image tokens repeat only with train.augment=false or train.clip_placements > 0 "
            "(the release's continuous random placement never repeats an input)"
        )
    if config.train.stage == "rec" and config.test.split:
        raise ConfigError("test.split: the REC stage (train.stage=rec) is validated by REC accuracy on val.split only; set test.split=null")
    config.model = model_config_from(raw.get("model") or {})
    _check_combinations(config)
    check_output_dir(config.run_dir, "run_dir")
    config.dataset = dict(raw.get("dataset") or {})
    return config


def decoder_trains(config: TrainRunConfig) -> bool:
    """Whether SAM's mask decoder trains at some epoch: stage res, unfrozen before the last epoch."""
    return config.train.stage == "res" and config.train.decoder_freeze_epochs < config.train.epochs


def _check_combinations(config: TrainRunConfig) -> None:
    """Settings each valid alone that together would be accepted with no effect (or a schedule that
    contradicts itself): one :class:`ConfigError` naming the keys. Rules (README, "Training"):

    - stage res, ``train.decoder_freeze_epochs >= train.epochs``: the mask decoder never unfreezes, so
      ``train.decoder_lr`` does nothing; refused unless ``train.decoder_lr=0`` says the decoder is meant to
      stay frozen for the whole run (a default freeze of 20 epochs must not silently outlast a short run);
    - ``train.warmup_epochs >= train.epochs``: the run never leaves its warm-up (no cosine at all);
    - ``train.min_lr`` above the learning rate of a group that trains (``train.lr``; ``train.decoder_lr``
      when the decoder unfreezes; ``train.text_encoder_lr`` / ``train.image_encoder_lr`` when the model
      fine-tunes CLIP's text tower / image blocks): the cosine would run upwards (per_epoch) or be clamped
      to a constant rate (per_iteration);
    - ``train.clip_placements > 0`` with ``train.augment=false``: placements choose among random letterbox
      offsets, and without augmentation every input is centred.
    """
    train, model = config.train, config.model
    if train.stage == "res" and train.decoder_freeze_epochs >= train.epochs and train.decoder_lr > 0:
        raise ConfigError(
            f"train.decoder_freeze_epochs={train.decoder_freeze_epochs} >= train.epochs={train.epochs}: SAM's mask decoder "
            f"would never unfreeze, so train.decoder_lr={train.decoder_lr:g} would do nothing; lower "
            "train.decoder_freeze_epochs below train.epochs, or set train.decoder_lr=0 to keep the decoder frozen for the whole run"
        )
    if train.warmup_epochs >= train.epochs:
        raise ConfigError(
            f"train.warmup_epochs={train.warmup_epochs} >= train.epochs={train.epochs}: the run would never leave its "
            "linear warm-up (its cosine decay toward train.min_lr never starts); lower train.warmup_epochs"
        )
    groups = [("train.lr", train.lr, True), ("train.decoder_lr", train.decoder_lr, decoder_trains(config)),
              ("train.text_encoder_lr", train.text_encoder_lr, model.finetune_text_encoder),
              ("train.image_encoder_lr", train.image_encoder_lr, model.finetune_image_blocks > 0)]
    for key, lr, trains in groups:
        if trains and train.min_lr > lr:
            raise ConfigError(
                f"train.min_lr={train.min_lr:g} is above {key}={lr:g}: the cosine schedule ends at train.min_lr, so that "
                "group's rate would rise over the run (per_epoch) or never decay (per_iteration); lower train.min_lr"
            )
    if train.clip_placements and not train.augment:
        raise ConfigError(
            f"train.clip_placements={train.clip_placements}: the K placements are offsets of the random letterbox "
            "(train.augment=true); with train.augment=false every CLIP input is centred; set train.clip_placements=0 "
            "or train.augment=true"
        )


def config_warnings(config: TrainRunConfig) -> list[str]:
    """Settings that are accepted but do nothing, or that let training data stand in for held-out data; the
    trainer prints each as one ``warning:`` line at its start. They are warnings, not errors, where a recipe may
    set them on purpose (a text cache in an experiment whose text tower may be frozen again by an override; a
    REC stage run from an experiment made for stage 2)."""
    train, val, model = config.train, config.val, config.model
    found = []
    if train.text_cache_gb > 0 and model.finetune_text_encoder:
        found.append(
            f"train.text_cache_gb={train.text_cache_gb:g} has no effect with model.finetune_text_encoder=true: a text tower "
            "that trains runs at every step, and each validation keeps a text cache of its own whatever this says"
        )
    if train.stage == "rec":
        defaults = ValSection()
        ignored = [f"val.{key}={getattr(val, key)}" for key in ("protocol", "overlays") if getattr(val, key) != getattr(defaults, key)]
        if ignored:
            found.append(
                f"{', '.join(ignored)} {'has' if len(ignored) == 1 else 'have'} no effect in the REC stage (train.stage=rec): "
                "it is validated by REC accuracy on the boxes, with no masks to compare or draw"
            )
    if val.split and val.split == train.split:
        found.append(
            f"val.split={val.split} is the training split (train.split): best/ is chosen on training data"
        )
    if config.test.split and config.test.split in (train.split, "train"):
        found.append(
            f"test.split={config.test.split} is the training split: the test results are on data the model trained on"
        )
    return found
