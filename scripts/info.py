"""Print a model's parameter count in the release's grouping (one line), then all counts as JSON.

    python scripts/info.py model=ssp_sam_224

The headline is the count the paper reports (18.37 M for SSP-SAM-224): see
``ssp_sam.model.parameter_counts`` for the grouping.

The model is built on PyTorch's "meta" device: nothing is allocated and no weight file is read,
so even SSP-SAM with SAM ViT-H is counted in a second.
"""

from __future__ import annotations

import json
from dataclasses import replace

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from ssp_sam.cli import reports_errors
from ssp_sam.config import model_config_from
from ssp_sam.model import build_model, parameter_counts


@hydra.main(config_path="../configs", config_name="info", version_base="1.3")
@reports_errors
def main(cfg: DictConfig) -> None:
    config = model_config_from(OmegaConf.to_container(cfg.model, resolve=True))
    with torch.device("meta"):
        model = build_model(replace(config, clip_checkpoint=None, sam_checkpoint=None, random_encoders=True))
    counts = parameter_counts(model)
    print(
        f"{config.name}: {counts['params_release_grouping']:,} parameters ({counts['params_release_grouping'] / 1e6:.2f} M) "
        "in the release's grouping: what this code trains (adapters, fusion, prompt generator, SAM's mask decoder: "
        f"{counts['trainable_params']:,}) plus the release's two unused modules (img2img_attn's projections, "
        "norm_text_cond_img); CLIP, SAM's image and prompt encoders are frozen and not counted, relative-position "
        "tables are buffers."
    )
    print(json.dumps({"model": config.name, **counts}))


if __name__ == "__main__":
    main()
