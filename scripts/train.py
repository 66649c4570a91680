"""Train SSP-SAM in the release's two stages.

    # stage 1, REC pretraining (box losses only; no SAM weights needed):
    torchrun --nproc_per_node=8 scripts/train.py experiment=rec_pretrain_224 model.clip_checkpoint=...
    # stage 2, per dataset, from the REC stage's last epoch as the release does:
    torchrun --nproc_per_node=8 scripts/train.py experiment=refcoco_224 init_checkpoint=runs/rec_pretrain_224/last \
        model.clip_checkpoint=... model.sam_checkpoint=...
    python scripts/train.py experiment=refcoco_224 init_checkpoint=runs/rec_pretrain_224/last resume=true   # continue an interrupted run

``train.max_minutes=M`` stops before an epoch that would end past M minutes (``last/`` saved) with exit status 3;
``resume=true`` continues.

An experiment named ovss_* (or ovss_model= / ovss_dataset= on the command line) trains an open-vocabulary
model instead (configs/train_ovss.yaml; docs/ovss_models.md), with the same exit status 3 after a stop by
train.max_minutes (checked at every iteration).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ssp_sam.cli import reports_errors
from ssp_sam.engine.trainer import train
from ssp_sam.ovss.engine.cli import wants_ovss
from ssp_sam.ovss.engine.trainer import train_ovss

EXIT_STOPPED = 3  # stopped by train.max_minutes before the last epoch; resume=true continues


@hydra.main(config_path="../configs", config_name="train_ovss" if wants_ovss(sys.argv[1:]) else "train", version_base="1.3")
@reports_errors
def main(cfg: DictConfig) -> None:
    if "ovss_model" in cfg:
        ovss = train_ovss(cfg)
        report(ovss.finished, f"at iteration {ovss.iteration}", f"{ovss.iteration} iterations", ovss.best_metric, ovss.run_dir)
    else:
        result = train(cfg)
        report(result.finished, f"after {result.epochs_run} epochs", f"{result.epochs_run} epochs", result.best_metric, result.run_dir)


def report(finished: bool, stopped_when: str, done: str, best_metric: float | None, run_dir: Path) -> None:
    """The run's last line; a run stopped by train.max_minutes exits with EXIT_STOPPED."""
    if not finished:
        print(f"stopped by train.max_minutes {stopped_when}; last/ saved in {run_dir}: rerun with resume=true")
        sys.exit(EXIT_STOPPED)
    best = f"{best_metric:.4f}" if best_metric is not None else "n/a"
    print(f"done: {done}, best validation metric {best}, checkpoints in {run_dir}/")


if __name__ == "__main__":
    main()
