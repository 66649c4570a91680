"""A run directory after a crash: put its checkpoints back in order before training starts or resumes.

A kill while ``last/`` or ``best/`` is being replaced leaves the old or the new version under a
side name (``ssp_sam/fileio.py``); a kill while the log is rewritten leaves a temporary file.
:func:`recover_run_dir` repairs both, so ``resume=true`` finds ``last/`` again.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..fileio import INCOMPLETE, recover_directory

CHECKPOINTS = ("last", "best")
LOG_FILE = "train_log.jsonl"


def recover_run_dir(run_dir: str | os.PathLike) -> None:
    """Finish or roll back interrupted checkpoint saves in ``run_dir`` and drop unfinished log rewrites.

    Prints one ``note:`` line on stderr per repair. Touches only names this code writes.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    for name in CHECKPOINTS:
        for done in recover_directory(run_dir / name):
            print(f"note: {done}", file=sys.stderr)
    for unfinished in run_dir.glob(f".{LOG_FILE}.*{INCOMPLETE}"):  # fileio.atomic_path's temporaries
        if unfinished.is_file():
            unfinished.unlink()
