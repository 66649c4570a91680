"""One builder for the three OVSS models, chosen by ``OVSSModelConfig.variant``."""

from __future__ import annotations

from collections.abc import Mapping

from omegaconf import DictConfig

from ..backbones.clip import build_clip_model
from ..backbones.sam import build_sam
from ..errors import ConfigError
from .catseg.clip_dense import CATSegCLIP
from .catseg.model import CATSeg
from .model import OVSSModel
from .model_config import OVSSModelConfig, ovss_config_from
from .sam_mi.dmi import HIGH_FREQUENCY_CHANNELS
from .sam_mi.model import SAMMI
from .sam_mi.proposals import SAMProposer
from .sam_vote import CATSegSAMVote


def build_ovss_model(config: OVSSModelConfig | Mapping | DictConfig) -> OVSSModel:
    """CAT-Seg (``catseg``), CAT-Seg + SAM vote (``catseg_sam_vote``) or SAM-MI (``sam_mi``), weights loaded.

    Raises:
        ConfigError: a weight file needed and not given (random encoders only with ``random_encoders``).
    """
    config = config if isinstance(config, OVSSModelConfig) else ovss_config_from(config)
    _require_weights(config)
    clip = build_clip_model(config.clip.arch, config.clip.checkpoint, config.clip.custom)
    dense_clip = CATSegCLIP(
        clip, config.clip.resolution, config.clip.guidance_layers, config.clip.finetune_qv, config.clip.finetune_positions,
        config.clip.dense, config.clip.surgery_blocks,
    )
    if not config.uses_sam:
        return OVSSModel(CATSeg(dense_clip, config), config)
    proposer = SAMProposer(build_sam(config.sam.variant, config.sam.checkpoint, config.sam.custom), config.proposals)
    if config.variant == "catseg_sam_vote":
        return CATSegSAMVote(CATSeg(dense_clip, config), proposer, config)
    extra = HIGH_FREQUENCY_CHANNELS if config.dmi.high_frequency else 0
    return SAMMI(CATSeg(dense_clip, config, decoder_extra_channels=extra), proposer, config)


def _require_weights(config: OVSSModelConfig) -> None:
    if config.random_encoders:
        return
    if config.clip.checkpoint is None:
        raise ConfigError("ovss_model.clip.checkpoint: a CLIP weight file is required (random_encoders=true for tests)")
    if config.uses_sam and config.sam.checkpoint is None:
        raise ConfigError("ovss_model.sam.checkpoint: a SAM weight file is required (random_encoders=true for tests)")
