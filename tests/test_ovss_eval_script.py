"""scripts/eval.py on an OVSS checkpoint: its options checked against configs/eval_ovss.yaml's schema before any
work (unknown keys by name, ranges, choices), and the results naming the weights that were evaluated even when a
training replaces the checkpoint meanwhile (tiny SAM-MI, two 64 x 64 scenes of three colour bands)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

import ssp_sam.ovss.engine.cli as ovss_cli
from conftest import REPO, run_eval_in_process
from ssp_sam.checkpoint import WEIGHTS_FILE
from ssp_sam.ovss.build import build_ovss_model
from ssp_sam.ovss.engine.checkpoint import save_ovss_checkpoint
from ssp_sam.ovss.engine.train_config import ovss_train_config_from

COLOURS = np.array([[230, 20, 20], [20, 20, 230], [20, 230, 20]], dtype=np.uint8)


@pytest.fixture(scope="module")
def bands(tmp_path_factory) -> Path:
    """Two scenes of three vertical colour bands (classes red, blue, green), as the semseg format reads them."""
    root = tmp_path_factory.mktemp("bands")
    rng = np.random.default_rng(0)
    for folder in ("images", "labels"):
        (root / folder / "train").mkdir(parents=True)
    for index in range(2):
        label = np.repeat(rng.permutation(3)[np.arange(64) * 3 // 64][None], 64, axis=0).astype(np.uint8)
        Image.fromarray(COLOURS[label]).save(root / "images" / "train" / f"{index:03d}.png")
        Image.fromarray(label).save(root / "labels" / "train" / f"{index:03d}.png")
    (root / "classes.json").write_text(json.dumps(["red", "blue", "green"]))
    return root


def _tiny_saver(path: Path, seed: int):
    """A function that saves a tiny SAM-MI (random encoders stored in it) at ``path`` as a training saves its
    checkpoints (built here: no Hydra composition inside the script's run)."""
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train_ovss", ["experiment=ovss_tiny", "ovss_dataset.root=/unused", f"run_dir={path.parent / 'run'}"])
    torch.manual_seed(seed)
    model = build_ovss_model(ovss_train_config_from(cfg).ovss_model)

    def save() -> Path:
        save_ovss_checkpoint(model, path, ["red", "blue", "green"])
        return path

    return save


def _save_tiny(path: Path, seed: int) -> Path:
    return _tiny_saver(path, seed)()


def _dataset_args(root: Path) -> list[str]:
    return ["ovss_dataset=semseg", f"ovss_dataset.root={root}", "ovss_dataset.split=train", "ovss_dataset.image_dir=images/train",
            "ovss_dataset.label_dir=labels/train", "ovss_dataset.image_ext=.png", "ovss_dataset.classes=classes.json",
            "eval.sliding_window=false", "workers=0", "precision=fp32", "threads=1", "progress=false", "device=cpu"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+max_image=2", "max_image: not an OVSS evaluation option (configs/eval_ovss.yaml lists them)"),
        ("cache_batch_size=0", "cache_batch_size=0: must be an integer >= 1"),
        ("threads=0", "threads=0: must be an integer >= 1 (or null)"),
        ("max_images=0", "max_images=0: must be an integer >= 1 (or null)"),
        ("workers=-1", "workers=-1: must be an integer >= 0"),
        ("precision=fp64", "precision: unknown value 'fp64'; expected one of auto, fp32, bf16, fp16"),
    ],
)
def test_ovss_eval_options_are_checked_before_any_work(tmp_path, monkeypatch, capsys, override, message):
    """Refused by name before the checkpoint or the data is read (neither exists here), used by this run or not
    (cache_batch_size without cache_dir); an unknown key given with + is not silently ignored."""
    monkeypatch.chdir(tmp_path)
    status, stderr = run_eval_in_process(
        monkeypatch, capsys, f"checkpoint={tmp_path / 'absent'}", *_dataset_args(tmp_path / "nowhere"), override)
    assert (status, stderr) == (2, f"error: {message}\n")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_ovss_results_name_the_weights_evaluated_when_the_checkpoint_is_replaced(bands, tmp_path, monkeypatch, capsys):
    checkpoint = _save_tiny(tmp_path / "last", seed=1)
    evaluated = _sha256(checkpoint / WEIGHTS_FILE)
    real_evaluate = ovss_cli.evaluate_ovss
    next_save = _tiny_saver(checkpoint, seed=2)

    def evaluate_while_training_saves(*args, **kwargs):
        next_save()  # the next save of a training, during the evaluation
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(ovss_cli, "evaluate_ovss", evaluate_while_training_saves)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "results.json"
    status, stderr = run_eval_in_process(monkeypatch, capsys, f"checkpoint={checkpoint}", *_dataset_args(bands), f"metrics_out={out}")
    assert status == 0, stderr
    record = json.loads(out.read_text())
    assert _sha256(checkpoint / WEIGHTS_FILE) != evaluated
    assert record["checkpoint_sha256"] == evaluated and record["weight_files"] == {}  # its encoders are embedded


def test_an_ovss_checkpoint_replaced_while_it_loads_is_refused(bands, tmp_path, monkeypatch, capsys):
    checkpoint = _save_tiny(tmp_path / "last", seed=1)
    real_load = ovss_cli.load_ovss_model
    next_save = _tiny_saver(checkpoint, seed=2)

    def load_while_training_saves(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        next_save()
        return loaded

    monkeypatch.setattr(ovss_cli, "load_ovss_model", load_while_training_saves)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "results.json"
    status, stderr = run_eval_in_process(monkeypatch, capsys, f"checkpoint={checkpoint}", *_dataset_args(bands), f"metrics_out={out}")
    assert status == 2 and stderr.startswith(f"error: {checkpoint}: changed while it was being loaded (") and stderr.count("\n") == 1
    assert not out.exists()
