"""Pretrain the small SAM of the ShapeWorld model: promptable segmentation from scratch.

    python scripts/pretrain_sam.py [steps=1500] [threads=2] [out=checkpoints/pretrained/tiny_sam.pth]

Writes the weights in Meta's flat .pth layout (loadable with ``build_sam("custom", checkpoint=...)``)
and ends with a line giving the held-out mIoU for one click at each object's centre. Bad arguments
print one line naming them and exit with code 2. Recipe and numbers: docs/pretraining.md.
"""

from __future__ import annotations

from dataclasses import fields

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from ssp_sam.cli import reports_errors
from ssp_sam.errors import ConfigError
from ssp_sam.predictor import resolve_device
from ssp_sam.pretrain.sam import HELDOUT_SPLIT, SAMPretrainSettings, pretrain_sam


@hydra.main(config_path="../configs", config_name="pretrain_sam", version_base="1.3")
@reports_errors
def main(cfg: DictConfig) -> None:
    if cfg.model.sam_variant != "custom":
        raise ConfigError(f"model.sam_variant: pretraining builds a 'custom' SAM, got {cfg.model.sam_variant!r}")
    if cfg.threads < 1:
        raise ConfigError(f"threads: must be >= 1, got {cfg.threads}")
    torch.set_num_threads(cfg.threads)
    settings = SAMPretrainSettings(**{field.name: cfg[field.name] for field in fields(SAMPretrainSettings)})
    _, result = pretrain_sam(
        OmegaConf.to_container(cfg.model.sam_custom, resolve=True),
        settings,
        out=cfg.out,
        device=resolve_device(cfg.device),
        progress=cfg.progress,
        log_dir=cfg.tensorboard,
    )
    print(
        f"SAM pretrained: {settings.steps} steps, final loss {result.losses[-1]:.4f}, "
        f"{result.seconds / 60:.1f} min; weights written to {cfg.out}"
    )
    print(
        f"held-out point-prompt mIoU {result.heldout_miou:.4f} over {result.heldout_instances} instances "
        f"({settings.eval_scenes} {HELDOUT_SPLIT} scenes, seed {settings.seed}, one click at each centre)"
    )


if __name__ == "__main__":
    main()
