"""Generate a ShapeWorld dataset: RES (RefCOCO layout), GRES (gRefCOCO layout) or OVSS (label maps).

    python scripts/make_shapeworld.py task=res out=data n_images=1000 seed=0 workers=4
    python scripts/make_shapeworld.py task=gres out=data n_images=1000 seed=0 'mirrors=[h, v]'   # + mirrored training scenes
    python scripts/make_shapeworld.py task=ovss out=data n_images=1000 seed=0 [background=ignore|class]
    python scripts/make_shapeworld.py ... skip_existing=true   # nothing to do when OUT already holds exactly this

Bad arguments print one line naming the argument and exit with code 2.
"""

import hydra
from omegaconf import DictConfig, OmegaConf

from ssp_sam.cli import reports_errors
from ssp_sam.data.shapeworld import GENERATOR_VERSION, existing_task, generate_dataset, generate_ovss_dataset
from ssp_sam.errors import ConfigError


@hydra.main(config_path="../configs", config_name="make_shapeworld", version_base=None)
@reports_errors
def main(cfg: DictConfig) -> None:
    n_images = OmegaConf.to_container(cfg.n_images) if OmegaConf.is_config(cfg.n_images) else cfg.n_images
    mirrors = [cfg.mirrors] if isinstance(cfg.mirrors, str) else list(cfg.mirrors or [])
    if cfg.skip_existing:
        made = existing_task(cfg.out, cfg.task, n_images, cfg.seed, mirrors)  # other settings in OUT: ConfigError
        if made is not None and made.get("background", cfg.background) == cfg.background:
            print(f"ShapeWorld {cfg.task}: {cfg.out} already holds it (generator {GENERATOR_VERSION}, seed {cfg.seed}, "
                  f"the same n_images and mirrors): nothing to do")
            return
    if cfg.task == "ovss":
        if mirrors:
            raise ConfigError("mirrors: only task=res and task=gres have spatial sentences to mirror")
        out = generate_ovss_dataset(cfg.out, n_images, cfg.seed, background=cfg.background, workers=cfg.workers)
        print(f"ShapeWorld-OVSS written to {out}")
        return
    out = generate_dataset(cfg.out, cfg.task, n_images, cfg.seed, workers=cfg.workers, mirrors=mirrors)
    print(f"ShapeWorld-Ref {cfg.task} written to {out}")


if __name__ == "__main__":
    main()
