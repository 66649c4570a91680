"""Print a model's parameter counts as one JSON line.

    python scripts/info.py model=ssp_sam_224

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
        model = build_model(replace(config, clip_checkpoint=None, sam_checkpoint=None))
    print(json.dumps({"model": config.name, **parameter_counts(model)}))


if __name__ == "__main__":
    main()
