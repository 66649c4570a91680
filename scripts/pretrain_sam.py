"""Pretrain the small SAM of a ShapeWorld model: promptable segmentation from scratch.

    python scripts/pretrain_sam.py [threads=2] [steps=900] [out=...]                  # the shipped model's SAM
    python scripts/pretrain_sam.py --config-name pretrain_sam_v2 threads=1 resume=true [max_minutes=55]

Writes the weights in Meta's flat .pth layout (loadable with ``build_sam("custom", checkpoint=...)``)
to ``out`` (default: the model config's ``sam_checkpoint``) and its report "{out}.json", and ends
with a line giving the held-out mIoU for one click at each object's centre. Saving, ``resume=true``,
``stop_after_steps`` / ``max_minutes`` (exit status 3, ``out`` not written) as in pretrain_clip.py.
Bad arguments print one line naming them and exit with code 2. Recipe and numbers: docs/pretraining.md.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from ssp_sam.cli import reports_errors
from ssp_sam.errors import ConfigError
from ssp_sam.backbones.sam import build_sam
from ssp_sam.pretrain.sam import HELDOUT_SPLIT, SAMPretrainSettings, finished_sam_stage, heldout_miou, pretrain_sam
from ssp_sam.pretrain.script import TEST_SPLIT, end_stage, fresh_seed_figures, fresh_test_seed, start_stage


def heldout_line(miou: float, instances: int, scenes: int, split: str, seed: int) -> str:
    return (
        f"held-out point-prompt mIoU {miou:.4f} over {instances} instances "
        f"({scenes} {split} scenes, seed {seed}, one click at each centre)"
    )


@hydra.main(config_path="../configs", config_name="pretrain_sam", version_base="1.3")
@reports_errors
def main(cfg: DictConfig) -> None:
    if cfg.model.sam_variant != "custom":
        raise ConfigError(f"model.sam_variant: pretraining builds a 'custom' SAM, got {cfg.model.sam_variant!r}")
    device, settings, control = start_stage(cfg, SAMPretrainSettings)
    test_seed = fresh_test_seed(cfg)
    sam_custom = OmegaConf.to_container(cfg.model.sam_custom, resolve=True)
    if cfg.resume and cfg.out is not None:
        report = finished_sam_stage(cfg.out, sam_custom, settings)
        if report is not None:
            print(f"SAM pretraining already finished: {cfg.out} (final loss {report['final_loss']:.4f})")
            print(heldout_line(report["heldout_miou"], report["heldout_instances"], settings.eval_scenes, HELDOUT_SPLIT, settings.seed))
            if test_seed is not None:
                def score() -> tuple[float, int]:
                    sam = build_sam("custom", checkpoint=cfg.out, custom=sam_custom).to(device).eval()
                    return heldout_miou(sam, settings, test_seed, TEST_SPLIT, settings.eval_scenes, cfg.progress)

                test = fresh_seed_figures(cfg.out, report, test_seed, settings.eval_scenes, score)
                print(heldout_line(*test, settings.eval_scenes, TEST_SPLIT, test_seed))
            return
    sam, result = pretrain_sam(
        sam_custom,
        settings,
        out=cfg.out,
        device=device,
        progress=cfg.progress,
        log_dir=cfg.tensorboard,
        control=control,
    )
    end_stage("SAM", result, settings.steps, control, cfg.out)
    print(heldout_line(result.heldout_miou, result.heldout_instances, settings.eval_scenes, HELDOUT_SPLIT, settings.seed))
    if test_seed is not None:
        test = fresh_seed_figures(
            cfg.out, None, test_seed, settings.eval_scenes,
            lambda: heldout_miou(sam, settings, test_seed, TEST_SPLIT, settings.eval_scenes, cfg.progress),
        )
        print(heldout_line(*test, settings.eval_scenes, TEST_SPLIT, test_seed))


if __name__ == "__main__":
    main()
