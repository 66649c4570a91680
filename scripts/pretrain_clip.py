"""Pretrain the small CLIP of the ShapeWorld model: region-caption contrast from scratch.

    python scripts/pretrain_clip.py [steps=1200] [threads=2] [out=checkpoints/pretrained/tiny_clip.pt]

Writes a plain open_clip state dict (loadable with ``build_clip_model("custom", checkpoint=...)``)
and ends with a line giving the held-out retrieval accuracies. Bad arguments print one line naming
them and exit with code 2. Recipe and numbers: docs/pretraining.md.
"""

from __future__ import annotations

from dataclasses import fields

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from ssp_sam.cli import reports_errors
from ssp_sam.errors import ConfigError
from ssp_sam.predictor import resolve_device
from ssp_sam.pretrain.clip import HELDOUT_SPLIT, CLIPPretrainSettings, pretrain_clip


@hydra.main(config_path="../configs", config_name="pretrain_clip", version_base="1.3")
@reports_errors
def main(cfg: DictConfig) -> None:
    if cfg.model.clip_arch != "custom":
        raise ConfigError(f"model.clip_arch: pretraining builds a 'custom' CLIP, got {cfg.model.clip_arch!r}")
    if cfg.threads < 1:
        raise ConfigError(f"threads: must be >= 1, got {cfg.threads}")
    torch.set_num_threads(cfg.threads)
    settings = CLIPPretrainSettings(**{field.name: cfg[field.name] for field in fields(CLIPPretrainSettings)})
    _, result = pretrain_clip(
        OmegaConf.to_container(cfg.model.clip_custom, resolve=True),
        cfg.model.surgery_blocks,
        settings,
        out=cfg.out,
        append_period=cfg.model.append_period,
        device=resolve_device(cfg.device),
        progress=cfg.progress,
        log_dir=cfg.tensorboard,
    )
    print(
        f"CLIP pretrained: {settings.steps} steps, final loss {result.losses[-1]:.4f}, "
        f"{result.seconds / 60:.1f} min; weights written to {cfg.out}"
    )
    held = result.heldout
    print(
        f"held-out accuracy ({settings.eval_scenes} {HELDOUT_SPLIT} scenes, seed {settings.seed}): "
        f"expression->object {held['expression_all']:.3f} (A {held['expression_A']:.3f}, "
        f"L {held['expression_L']:.3f}, R {held['expression_R']:.3f}), pointing {held['pointing']:.3f}, "
        f"object->description {held['description']:.3f} (colour {held['color']:.3f}, "
        f"shape {held['shape']:.3f}, size {held['size']:.3f})"
    )


if __name__ == "__main__":
    main()
