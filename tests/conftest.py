"""Shared fixtures: tiny SSP-SAM models built from the same code as the real configurations."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ssp_sam.backbones.sam import build_sam
from ssp_sam.config import ModelConfig, model_config_from
from ssp_sam.model import SSPSAM, build_model

REPO = Path(__file__).resolve().parents[1]

torch.set_num_threads(1)  # pytest-xdist runs two workers on two cores
# Weight-file hashes are remembered here, not in the user's ~/.cache (ssp_sam/weight_identity.py).
os.environ.setdefault("SSP_SAM_CACHE_HOME", tempfile.mkdtemp(prefix="ssp_sam_tests_"))


def tiny_config(**overrides) -> ModelConfig:
    """configs/model/tiny.yaml with dotted-key overrides, e.g. ``**{"adapters.visual": False}``."""
    base = OmegaConf.load(REPO / "configs" / "model" / "tiny.yaml")
    for key, value in overrides.items():
        OmegaConf.update(base, key, value, merge=True)
    return model_config_from(base)


def tiny_model(seed: int = 0, **overrides) -> SSPSAM:
    torch.manual_seed(seed)
    return build_model(tiny_config(**overrides)).eval()


@pytest.fixture
def model() -> SSPSAM:
    return tiny_model()


def run_script(script: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``scripts/<script>`` with this interpreter; returns the completed process (text output)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), *args],
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def run_eval_in_process(monkeypatch, capsys, *overrides: str) -> tuple[int, str]:
    """scripts/eval.py run as __main__ in this process (no interpreter start-up): (exit status, stderr)."""
    script = REPO / "scripts" / "eval.py"
    monkeypatch.setattr(sys, "argv", [str(script), *overrides])
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exited:
        return exited.code, capsys.readouterr().err
    return 0, capsys.readouterr().err


def write_sam_file(path: Path, custom, seed: int) -> Path:
    """Random SAM weights of the given custom sizes in Meta's flat .pth layout (every tensor perturbed)."""
    torch.manual_seed(seed)
    state = build_sam("custom", custom=dict(custom)).state_dict()
    torch.save({k: v + 0.05 * torch.randn_like(v) for k, v in state.items()}, path)
    return path
