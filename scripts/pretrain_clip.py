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
from ssp_sam.pretrain.clip import HELDOUT_SPLIT, CLIPPretrainSettings, finished_clip_stage, pretrain_clip
from ssp_sam.pretrain.script import end_stage, start_stage


def heldout_line(held: dict, settings: CLIPPretrainSettings) -> str:
    return (
        f"held-out accuracy ({settings.eval_scenes} {HELDOUT_SPLIT} scenes, seed {settings.seed}): "
        f"expression->object {held['expression_all']:.3f} (A {held['expression_A']:.3f}, "
        f"L {held['expression_L']:.3f}, R {held['expression_R']:.3f}), pointing {held['pointing']:.3f}, "
        f"object->description {held['description']:.3f} (colour {held['color']:.3f}, "
        f"shape {held['shape']:.3f}, size {held['size']:.3f}), dense labelling mIoU {held['dense_miou']:.3f} "
        f"(object classes {held['dense_miou_objects']:.3f})"
    )


@hydra.main(config_path="../configs", config_name="pretrain_clip", version_base="1.3")
@reports_errors
def main(cfg: DictConfig) -> None:
    if cfg.model.clip_arch != "custom":
        raise ConfigError(f"model.clip_arch: pretraining builds a 'custom' CLIP, got {cfg.model.clip_arch!r}")
    device, settings, control = start_stage(cfg, CLIPPretrainSettings)
    clip_custom = OmegaConf.to_container(cfg.model.clip_custom, resolve=True)
    if cfg.resume and cfg.out is not None:
        report = finished_clip_stage(cfg.out, clip_custom, cfg.model.surgery_blocks, settings, cfg.model.append_period)
        if report is not None:
            print(f"CLIP pretraining already finished: {cfg.out} (final loss {report['final_loss']:.4f})")
            print(heldout_line(report["heldout"], settings))
            return
    _, result = pretrain_clip(
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
    print(heldout_line(result.heldout, settings))


if __name__ == "__main__":
    main()
