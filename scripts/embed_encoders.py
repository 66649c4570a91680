"""Make a checkpoint self-contained: store its frozen CLIP and SAM in it instead of naming their files.

    python scripts/embed_encoders.py checkpoint=runs/shapeworld_default_v2/best out=checkpoints/shapeworld_default

Our small ShapeWorld runs train with ``train.save_encoders=false``, so their checkpoints store what
trains (a few MB) and name the committed encoder files (``checkpoints/pretrained/``): a run directory
is small enough to commit at the end of a session and resume on the next machine. The shipped models
carry their encoders, so that they load without those files: this script writes that copy, for SSP-SAM
and OVSS (CAT-Seg, SAM-MI) checkpoints alike. The weight files are checked against the fingerprints the
checkpoint recorded (a changed file is an error, not a silently different model); the copy computes what
the checkpoint computes with its files. The trainer state is not copied: resume from the run directory.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from ssp_sam.checkpoint import embed_encoders
from ssp_sam.cli import reports_errors
from ssp_sam.errors import ConfigError
from ssp_sam.ovss.engine.checkpoint import embed_ovss_encoders, is_ovss_checkpoint


@hydra.main(config_path="../configs", config_name="embed_encoders", version_base="1.3")
@reports_errors
def main(cfg: DictConfig) -> None:
    checkpoint, out = Path(cfg.checkpoint), Path(cfg.out)
    if out.resolve() == (checkpoint if checkpoint.is_dir() else checkpoint.parent).resolve():
        raise ConfigError(f"out={out}: the checkpoint itself; write the self-contained copy elsewhere (its trainer state would be lost)")
    written = embed_ovss_encoders(checkpoint, out) if is_ovss_checkpoint(checkpoint) else embed_encoders(checkpoint, out)
    print(f"wrote {written}: {checkpoint} with its frozen encoders stored")


if __name__ == "__main__":
    main()
