"""A checkpoint of the REC pretraining stage is refused for masks: its mask decoder was never trained.

The stage runs no SAM, so the mask head it stores is its random initialisation; evaluation and prediction
must stop with one line saying so (also when a SAM file is named), while stage 2 still starts from it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from ssp_sam.checkpoint import CONFIG_FILE, load_model, save_checkpoint
from ssp_sam.data.shapeworld import generate_dataset
from ssp_sam.engine.trainer import Trainer
from ssp_sam.errors import CheckpointError
from ssp_sam.predictor import Predictor

from conftest import run_script, tiny_config, tiny_model, write_sam_file
from test_trainer import compose_train, rec_overrides, train_overrides, write_rec_fixture

REFUSAL = r"a stage-1 \(REC pretraining, run.train.stage=rec\) checkpoint, whose mask decoder was never trained"


@pytest.fixture(scope="module")
def rec_run(tmp_path_factory) -> Path:
    """A REC-stage run of the tiny model, one epoch, as scripts/train.py train.stage=rec writes it."""
    folder = tmp_path_factory.mktemp("rec")
    Trainer(compose_train(rec_overrides(write_rec_fixture(folder / "data"), folder / "run", folder / "cache", "train.epochs=1"))).fit()
    assert json.loads((folder / "run" / "last" / CONFIG_FILE).read_text())["run"]["train"]["stage"] == "rec"
    return folder / "run"


def test_load_model_refuses_a_rec_stage_checkpoint(rec_run, tmp_path):
    sam = write_sam_file(tmp_path / "sam.pth", tiny_config().sam_custom, 0)
    for checkpoint in (rec_run / "last", rec_run / "best", rec_run / "last" / "model.safetensors"):
        for settings in (None, {"sam_checkpoint": str(sam)}):  # SAM's own decoder is not taken either
            with pytest.raises(CheckpointError, match=rf"^{checkpoint}: {REFUSAL}.*init_checkpoint={checkpoint}") as error:
                load_model(checkpoint, settings)
            assert "\n" not in str(error.value)
    with pytest.raises(CheckpointError, match=REFUSAL):
        Predictor.from_checkpoint(rec_run / "last")


def test_a_stage_two_checkpoint_still_loads(tmp_path):
    """Only the REC stage is refused: a run of the mask stage (train.stage=res) loads."""
    directory = save_checkpoint(tiny_model(), tmp_path / "res", extra={"run": {"train": {"stage": "res"}}})
    assert load_model(directory) is not None


def test_stage_two_starts_from_a_rec_stage_checkpoint(rec_run, tmp_path):
    """The trainer's init_checkpoint reads it without load_model: not refused."""
    root = tmp_path / "shapeworld"
    generate_dataset(root, "res", {"train": 4}, seed=3, progress=False)
    overrides = train_overrides(root, tmp_path / "stage2", tmp_path / "cache", "train.epochs=1", f"init_checkpoint={rec_run / 'last'}")
    assert Trainer(compose_train(overrides)).stage == "res"


def test_scripts_refuse_a_rec_stage_checkpoint_in_one_line(rec_run, tmp_path):
    """With a SAM file named (what the error of a checkpoint without one used to ask for), the scripts ran the
    REC stage's random mask decoder and exited 0."""
    Image.new("RGB", (40, 20), (30, 90, 200)).save(tmp_path / "scene.png")
    generate_dataset(tmp_path / "data", "res", {"val": 1}, seed=1, progress=False)
    checkpoint = rec_run / "last"
    sam = f"model.sam_checkpoint={write_sam_file(tmp_path / 'sam.pth', tiny_config().sam_custom, 0)}"
    runs = {
        "predict.py": run_script(
            "predict.py", f"checkpoint={checkpoint}", sam, f"image={tmp_path / 'scene.png'}", "expressions=[a thing]",
            f"out_dir={tmp_path / 'out'}", "device=cpu",
        ),
        "eval.py": run_script(
            "eval.py", f"checkpoint={checkpoint}", sam, "dataset=shapeworld", f"dataset.root={tmp_path / 'data'}",
            "dataset.split=val", "device=cpu", "progress=false", "workers=0",
        ),
    }
    for script, result in runs.items():
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, (script, result.stderr[-2000:])
        assert lines[0].startswith(f"error: {checkpoint}: a stage-1 (REC pretraining"), (script, lines[0])
    assert not (tmp_path / "out").exists()
