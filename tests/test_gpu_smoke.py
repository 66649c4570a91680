"""scripts/gpu_smoke.sh runs its GPU checks on a CPU when asked, so CI keeps the script itself working.

On a GPU machine the same commands run with nccl and --device cuda; here they run with gloo on the
CPU and the benchmarks in their --quick form. A broken option name or command in the script fails
this test instead of the first GPU run.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import REPO


@pytest.mark.slow
def test_gpu_smoke_script_runs_on_cpu(tmp_path):
    env = {**os.environ, "SMOKE_DEVICE": "cpu", "SMOKE_QUICK": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    out = tmp_path / "smoke"
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_smoke.sh"), str(out)], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "training with 2 process(es)" in result.stdout and "all checks passed on cpu" in result.stdout
    assert (out / "run" / "best" / "model.safetensors").is_file()
    results = json.loads((out / "results_test.json").read_text())
    assert results["split"] == "test" and results["n_images"] == 4
    assert (out / "ovss_run" / "best").is_dir()
    ovss_results = json.loads((out / "ovss_results_test.json").read_text())
    assert ovss_results["split"] == "test" and ovss_results["n_images"] == 4 and ovss_results["protocol"] == "whole_image"
    assert "hIoU" in ovss_results["metrics"]
    for bench in ("bench_train_step", "bench_eval_shared", "bench_shared_encoders", "bench_sam_encoder", "bench_ovss_tspp"):
        assert json.loads((out / f"{bench}.json").read_text()), bench


def test_gpu_smoke_script_refuses_without_cuda(tmp_path):
    """Without a GPU (and without SMOKE_DEVICE=cpu) it says so in one line and exits 2."""
    env = {k: v for k, v in os.environ.items() if k not in ("SMOKE_DEVICE", "SMOKE_QUICK")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run(["bash", str(REPO / "scripts" / "gpu_smoke.sh"), str(tmp_path / "o")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("gpu_smoke: no CUDA device visible")
