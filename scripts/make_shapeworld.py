"""Generate a ShapeWorld-Ref dataset (RES in the RefCOCO layout, GRES in the gRefCOCO layout).

    python scripts/make_shapeworld.py task=res out=data n_images=1000 seed=0 workers=4

Bad arguments print one line naming the argument and exit with code 2.
"""

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from ssp_sam.data.shapeworld import generate_dataset
from ssp_sam.errors import SSPSAMError


@hydra.main(config_path="../configs", config_name="make_shapeworld", version_base=None)
def main(cfg: DictConfig) -> None:
    n_images = OmegaConf.to_container(cfg.n_images) if OmegaConf.is_config(cfg.n_images) else cfg.n_images
    try:
        out = generate_dataset(cfg.out, cfg.task, n_images, cfg.seed, workers=cfg.workers)
    except SSPSAMError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"ShapeWorld-Ref {cfg.task} written to {out}")


if __name__ == "__main__":
    main()
