"""The shipped ShapeWorld SAM-MI: present, small, self-contained, no worse than the README reports, on target.

Its reference numbers are ``results_shapeworld_ovss_test.json`` in the checkpoint directory, written by
the README's evaluation command (TSPP, whole 256x256 scenes, fp32) on a 200-image split of seed 99. Here
the model is evaluated the same way on a fresh 100-image split of another seed; CI fails when a figure
drops more than 0.05 below its reference (a regression) or below the issue's targets (unseen mIoU >= 0.60,
all-class mIoU >= 0.75) with the same margin.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ssp_sam.data.shapeworld.ovss import generate_ovss_dataset
from ssp_sam.engine.precision import resolve_precision
from ssp_sam.ovss.data import load_ovss_dataset
from ssp_sam.ovss.engine.checkpoint import load_ovss_model
from ssp_sam.ovss.engine.evaluator import evaluate_ovss
from ssp_sam.ovss.engine.train_config import OVSSEvalSection
from ssp_sam.ovss.predict import DEFAULT_OVSS_CHECKPOINT

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CHECK_SEED = 434343  # neither a training seed (7), the README's (99) nor the demo's
N_IMAGES = 100  # at 40 scenes some of the 48 classes sit in one or two images: mIoU moved by 0.06
MARGIN = 0.05
TARGETS = {"mIoU": 0.75, "mIoU unseen": 0.60}
REFERENCE_FILE = DEFAULT_OVSS_CHECKPOINT / "results_shapeworld_ovss_test.json"


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict[str, float]:
    root = tmp_path_factory.mktemp("shapeworld_ovss_check")
    generate_ovss_dataset(root, {"test": N_IMAGES}, seed=CHECK_SEED, progress=False)
    dataset_cfg = OmegaConf.load(CONFIGS / "ovss_dataset" / "shapeworld_ovss.yaml")
    dataset_cfg.root = str(root)
    model = load_ovss_model(DEFAULT_OVSS_CHECKPOINT).model
    device = torch.device("cpu")
    result = evaluate_ovss(model, load_ovss_dataset(dataset_cfg), OVSSEvalSection(sliding_window=False), device,
                           resolve_precision("fp32", device), progress=False, workers=0)
    return result.metrics


def test_shipped_ovss_checkpoint_is_small_and_self_contained():
    files = list(DEFAULT_OVSS_CHECKPOINT.iterdir())
    assert {f.name for f in files} >= {"model.safetensors", "config.json", REFERENCE_FILE.name}
    assert sum(f.stat().st_size for f in files) < 30 * 2**20
    stored = json.loads((DEFAULT_OVSS_CHECKPOINT / "config.json").read_text())
    config = stored["ovss_model"]
    assert config["variant"] == "sam_mi" and config["points"] == "tspp"
    assert config["clip"]["checkpoint"] is None and config["sam"]["checkpoint"] is None  # encoders embedded


def test_no_regression_against_the_reported_numbers(measured):
    reference = json.loads(REFERENCE_FILE.read_text())["metrics"]
    for key in ("mIoU", "mIoU seen", "mIoU unseen", "hIoU"):
        assert measured[key] >= reference[key] - MARGIN, (key, measured, reference)


def test_targets(measured):
    for key, target in TARGETS.items():
        assert measured[key] >= target - MARGIN, (key, measured)
