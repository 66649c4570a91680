"""Train SSP-SAM in the release's two stages.

    # stage 1, REC pretraining (box losses only; no SAM weights needed):
    torchrun --nproc_per_node=8 scripts/train.py experiment=rec_pretrain_224 model.clip_checkpoint=...
    # stage 2, per dataset, from the REC stage's last epoch as the release does:
    torchrun --nproc_per_node=8 scripts/train.py experiment=refcoco_224 init_checkpoint=runs/rec_pretrain_224/last \
        model.clip_checkpoint=... model.sam_checkpoint=...
    python scripts/train.py experiment=refcoco_224 resume=true      # continue an interrupted run

``train.max_minutes=M`` stops after the epoch that passes M minutes (``last/`` saved) with exit status 3;
``resume=true`` continues.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from ssp_sam.cli import reports_errors
from ssp_sam.engine.trainer import train

EXIT_STOPPED = 3  # stopped by train.max_minutes before the last epoch; resume=true continues


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
@reports_errors
def main(cfg: DictConfig) -> None:
    result = train(cfg)
    if not result.finished:
        print(f"stopped by train.max_minutes after {result.epochs_run} epochs; last/ saved in {result.run_dir}: rerun with resume=true")
        sys.exit(EXIT_STOPPED)
    best = f"{result.best_metric:.4f}" if result.best_metric is not None else "n/a"
    print(f"done: {result.epochs_run} epochs, best validation metric {best}, checkpoints in {result.run_dir}/")


if __name__ == "__main__":
    main()
