"""Pretrain the small CLIP of a ShapeWorld model: region-caption contrast (and a dense term) from scratch.

    python scripts/pretrain_clip.py [threads=2] [steps=900] [out=...]                 # the shipped model's CLIP
    python scripts/pretrain_clip.py --config-name pretrain_clip_v2 threads=1 resume=true [max_minutes=55]

Writes a plain open_clip state dict (loadable with ``build_clip_model("custom", checkpoint=...)``) to
``out`` (default: the model config's ``clip_checkpoint``) and its report "{out}.json", and ends with
a line giving the held-out figures. A stage state "{out}.resume" is saved every ``save_every`` steps;
``resume=true`` continues from it exactly, or, when ``out`` already holds the finished result of the
same configuration, prints its figures and does nothing else. Stopped by ``stop_after_steps`` /
``max_minutes`` before the end, it saves the state (none when no step was done) and exits with
status 3 (``out`` not written).
Bad arguments print one line naming them and exit with code 2. Recipe and numbers: docs/pretraining.md.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from ssp_sam.cli import reports_errors
from ssp_sam.errors import ConfigError
from ssp_sam.backbones.clip import build_clip_model
from ssp_sam.pretrain.clip import HELDOUT_SPLIT, CLIPPretrainSettings, finished_clip_stage, heldout_figures, pretrain_clip
from ssp_sam.pretrain.script import TEST_SPLIT, end_stage, fresh_seed_figures, fresh_test_seed, start_stage


def heldout_line(held: dict, scenes: int, split: str, seed: int) -> str:
    return (
        f"held-out accuracy ({scenes} {split} scenes, seed {seed}): "
        f"expression->object {held['expression_all']:.3f} (A {held['expression_A']:.3f}, "
        f"L {held['expression_L']:.3f}, R {held['expression_R']:.3f}), pointing {held['pointing']:.3f}, "
        f"object->description {held['description']:.3f} (colour {held['color']:.3f}, "
        f"shape {held['shape']:.3f}, size {held['size']:.3f}), dense labelling mIoU "
        + (f"on object patches {held['dense_miou_covered']:.3f} (all patches " if "dense_miou_covered" in held else "(all patches ")
        + f"{held['dense_miou']:.3f}, object classes {held['dense_miou_objects']:.3f})"  # reports before 2026-12-01 lack the first
    )


@hydra.main(config_path="../configs", config_name="pretrain_clip", version_base="1.3")
@reports_errors
def main(cfg: DictConfig) -> None:
    if cfg.model.clip_arch != "custom":
        raise ConfigError(f"model.clip_arch: pretraining builds a 'custom' CLIP, got {cfg.model.clip_arch!r}")
    device, settings, control = start_stage(cfg, CLIPPretrainSettings)
    test_seed = fresh_test_seed(cfg)
    clip_custom = OmegaConf.to_container(cfg.model.clip_custom, resolve=True)
    blocks, period = cfg.model.surgery_blocks, cfg.model.append_period
    if cfg.resume and cfg.out is not None:
        report = finished_clip_stage(cfg.out, clip_custom, blocks, settings, period)
        if report is not None:
            print(f"CLIP pretraining already finished: {cfg.out} (final loss {report['final_loss']:.4f})")
            print(heldout_line(report["heldout"], settings.eval_scenes, HELDOUT_SPLIT, settings.seed))
            if test_seed is not None:
                def score() -> dict[str, float]:
                    model = build_clip_model("custom", checkpoint=cfg.out, custom=clip_custom).to(device)
                    return heldout_figures(model, blocks, period, test_seed, TEST_SPLIT, settings.eval_scenes, cfg.progress)

                test = fresh_seed_figures(cfg.out, report, test_seed, settings.eval_scenes, score)
                print(heldout_line(test, settings.eval_scenes, TEST_SPLIT, test_seed))
            return
    model, result = pretrain_clip(
        clip_custom,
        cfg.model.surgery_blocks,
        settings,
        out=cfg.out,
        append_period=cfg.model.append_period,
        device=device,
        progress=cfg.progress,
        log_dir=cfg.tensorboard,
        control=control,
    )
    end_stage("CLIP", result, settings.steps, control, cfg.out)
    print(heldout_line(result.heldout, settings.eval_scenes, HELDOUT_SPLIT, settings.seed))
    if test_seed is not None:
        test = fresh_seed_figures(
            cfg.out, None, test_seed, settings.eval_scenes,
            lambda: heldout_figures(model, blocks, period, test_seed, TEST_SPLIT, settings.eval_scenes, cfg.progress),
        )
        print(heldout_line(test, settings.eval_scenes, TEST_SPLIT, test_seed))


if __name__ == "__main__":
    main()
