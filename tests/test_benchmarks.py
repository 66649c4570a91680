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


def test_loader_memory_verdict_needs_a_margin_beyond_the_run_to_run_spread():
    """Peaks of two runs per count: medians 1050 / 1155 / 1245 MiB, spreads 100 / 10 / 10 MiB. Each worker beyond 2
    adds (1245 - 1155) / 2 = 45 MiB, with a noise of max(10, 10) / 2 = 5 MiB: a bound of 60 is met, 30 is exceeded,
    and 48 (a margin of 3) says nothing either way."""
    mib = 2**20
    peaks = {0: (1000, 1100), 2: (1150, 1160), 4: (1240, 1250)}
    runs = {workers: [{"peak_total_pss_bytes": peak * mib} for peak in values] for workers, values in peaks.items()}
    rows = {row["workers"]: row for row in bench_loader_memory.summarize(runs, 60 * mib)}
    assert rows[4]["growth_per_added_worker_bytes"] == 45 * mib and rows[4]["noise_per_worker_bytes"] == 5 * mib
    assert rows[2]["growth_over_0_workers_bytes"] == 105 * mib and rows[0]["peak_spread_bytes"] == 100 * mib
    assert rows[4]["within_bound"] is True and rows[2]["within_bound"] is None  # 2: the reference, not judged
    assert bench_loader_memory.summarize(runs, 30 * mib)[2]["within_bound"] is False
    assert bench_loader_memory.summarize(runs, 48 * mib)[2]["within_bound"] is None


def test_loader_memory_judges_each_workers_own_peak_against_an_idle_worker_and_its_batches():
    """Largest workers' peak private memory, three runs per count: 2 workers 60 / 62 / 61 MiB (median 61, spread 2), 4 workers
    70 / 90 / 72 (median 72, spread 20). A bound of 65 MiB: 2 within it beyond the spread, 4 above it by 7 MiB, less
    than its spread (not established); a bound of 100 settles both; 0 workers is not judged."""
    mib = 2**20
    peaks = {0: [[], [], []], 2: [[60, 41], [62, 40], [61, 39]], 4: [[70, 50, 50, 49], [90, 51, 50, 50], [72, 50, 49, 49]]}
    runs = {workers: [{"worker_peak_private_bytes": [p * mib for p in run]} for run in values] for workers, values in peaks.items()}
    rows = {row["workers"]: row for row in bench_loader_memory.summarize_workers(runs, 65 * mib)}
    assert set(rows) == {2, 4}
    assert rows[2]["median_bytes"] == 61 * mib and rows[2]["spread_bytes"] == 2 * mib and rows[2]["within_bound"] is True
    assert rows[4]["median_bytes"] == 72 * mib and rows[4]["spread_bytes"] == 20 * mib and rows[4]["within_bound"] is None
    assert all(row["within_bound"] is True for row in bench_loader_memory.summarize_workers(runs, 100 * mib))
    assert bench_loader_memory.summarize_workers(runs, 30 * mib)[0]["within_bound"] is False
