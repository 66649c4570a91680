"""What the benchmarks hand the trainer must be a run it accepts: a benchmark that cannot start measures nothing,
and no other test runs bench_loader_memory (too slow for the suite; scripts/gpu_smoke.sh runs the others)."""

from __future__ import annotations

import sys

from conftest import REPO
from test_trainer import compose_train

from ssp_sam.engine.train_config import train_run_config_from

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_loader_memory  # noqa: E402


def test_loader_memory_runs_are_training_configs_with_random_encoders(tmp_path):
    config = train_run_config_from(compose_train(bench_loader_memory.train_overrides(tmp_path, "run", 2, 4, 8, epochs=2)))
    assert config.model.random_encoders and config.model.clip_checkpoint is None and config.model.sam_checkpoint is None
    assert (config.train.workers, config.train.epochs, config.train.max_steps_per_epoch, config.train.batch_size) == (2, 2, 4, 8)
