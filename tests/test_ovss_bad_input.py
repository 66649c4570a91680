"""Bad input to the OVSS scripts (issue 14): an empty class list, duplicate class names, label values beyond the
classes, a label map of another size than its image: one line naming the file or key, exit 2, nothing written.

check_data.py's report of the same label problems is tested in test_ovss_data.py
(test_check_data_reports_every_ovss_problem); here the same problems met while evaluating and training, where
data-loader workers read the labels."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ssp_sam.cli import reports_errors
from ssp_sam.errors import ConfigError, DatasetError
from ssp_sam.ovss import predict as ovss_predict
from ssp_sam.ovss.build import build_ovss_model
from ssp_sam.ovss.engine.checkpoint import save_ovss_checkpoint
from ssp_sam.ovss.predict import check_user_classes, predict_to_folder
from ssp_sam.ovss.sliding_window import check_sliding_window, sliding_window_inference

from conftest import REPO, run_script


def _one_error_line(result) -> str:
    """The run failed with exit 2 and exactly one ``error:`` line, the last on stderr (progress bars may precede it)."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    return errors[0]


def _pair(images: Path, labels: Path, name: str, image_hw: tuple[int, int], label: np.ndarray) -> None:
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*image_hw, 3), 90, np.uint8)).save(images / f"{name}.png")
    Image.fromarray(label.astype(np.uint8)).save(labels / f"{name}.png")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The script runs, two at a time: predict with no classes and with classes for an SSP-SAM checkpoint, eval
    meeting a label value 7 of 3 classes, training meeting label maps 30x50 for 40x50 images (both with two
    data-loader workers)."""
    folder = tmp_path_factory.mktemp("bad_ovss")
    torch.manual_seed(0)
    model = build_ovss_model(OmegaConf.load(REPO / "configs" / "ovss_model" / "tiny.yaml"))
    save_ovss_checkpoint(model, folder / "checkpoint", ["a", "b", "c"])
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(folder / "scene.png")

    evaluation = folder / "eval_data"
    _pair(evaluation / "imgs", evaluation / "labels", "a", (20, 30), np.zeros((20, 30)))
    _pair(evaluation / "imgs", evaluation / "labels", "b", (20, 30), np.full((20, 30), 7))
    training = folder / "train_data"
    for name in "abcd":
        _pair(training / "images/train", training / "labels/train", name, (40, 50), np.zeros((30, 50)))
    (training / "classes.json").write_text('["x", "y"]')

    commands = {
        "predict": (
            "predict.py", f"checkpoint={folder / 'checkpoint'}", f"image={folder / 'scene.png'}", "classes=[]",
            f"out_dir={folder / 'predict_out'}", "device=cpu",
        ),
        "eval": (
            "eval.py", f"checkpoint={folder / 'checkpoint'}", "ovss_dataset=semseg", f"ovss_dataset.root={evaluation}",
            "ovss_dataset.image_dir=imgs", "ovss_dataset.label_dir=labels", "ovss_dataset.image_ext=.png",
            "ovss_dataset.classes=[a, b, c]", "eval.sliding_window=false", "workers=2", "device=cpu",
            f"metrics_out={folder / 'metrics.json'}",
        ),
        "ssp_sam checkpoint with classes": (
            "predict.py", f"checkpoint={REPO / 'checkpoints' / 'shapeworld_default'}", f"image={folder / 'scene.png'}",
            "classes=[a, b]", f"out_dir={folder / 'predict_out'}", "device=cpu",
        ),
        "train": (
            "train.py", "experiment=ovss_tiny", f"ovss_dataset.root={training}", f"run_dir={folder / 'run'}",
            "train.workers=2", "val.split=null",
        ),
        "eval unresolvable": (
            "eval.py", f"checkpoint={folder / 'checkpoint'}", "ovss_dataset=semseg",
            "ovss_dataset.root=${oc.env:SSP_SAM_TEST_UNSET_VARIABLE}", "device=cpu",
        ),
    }  # fmt: skip
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(commands, pool.map(lambda command: run_script(*command), commands.values())))
    return {"folder": folder, "results": results, "eval_data": evaluation, "train_data": training}


def test_predict_with_an_empty_class_list(runs):
    assert _one_error_line(runs["results"]["predict"]) == "error: classes: empty class list"
    assert not (runs["folder"] / "predict_out").exists()


def test_predict_with_classes_and_a_checkpoint_of_ssp_sam(runs):
    config = REPO / "checkpoints" / "shapeworld_default" / "config.json"
    line = _one_error_line(runs["results"]["ssp_sam checkpoint with classes"])
    assert line == f"error: {config}: not an OVSS checkpoint (no 'format': 'ssp_sam.ovss' with an 'ovss_model' section)"
    assert not (runs["folder"] / "predict_out").exists()


def test_eval_label_values_beyond_the_classes_name_the_file(runs):
    line = _one_error_line(runs["results"]["eval"])
    label = runs["eval_data"] / "labels" / "b.png"
    assert line == f"error: {label}: label values 7 are outside the 3 classes (0..2) and not the ignore value 255"
    assert not (runs["folder"] / "metrics.json").exists()


def test_eval_with_an_unresolvable_value_names_it_in_one_line(runs):
    line = _one_error_line(runs["results"]["eval unresolvable"])
    assert line.startswith("error: ovss_dataset.root: cannot be resolved (") and "SSP_SAM_TEST_UNSET_VARIABLE" in line, line


def test_training_label_of_another_size_names_the_file(runs):
    line = _one_error_line(runs["results"]["train"])
    labels = runs["train_data"] / "labels" / "train"
    assert line.startswith(f"error: {labels}/") and line.endswith(".png: label map is 30x50 (HxW) but its image is 40x50")
    run_dir = runs["folder"] / "run"
    assert not (run_dir / "last").exists() and not (run_dir / "best").exists()  # no checkpoint from a failed start


@pytest.mark.parametrize(
    "classes, message",
    [
        ([], "classes: empty class list"),
        (["cat", "dog", "cat"], "classes: duplicate class name 'cat' (positions 0 and 2)"),
        (["Cat", "dog", "cat "], "classes: duplicate class name: 'cat ' (class 2) reads as 'Cat' (class 0) to the text encoder ('cat')"),
        (["tv, television", "tv"], "classes: duplicate class name: 'tv' (class 1) reads as 'tv, television' (class 0)"),
        (["cat", " "], "classes: class 1 must be a non-blank string"),
        (["cat", None], "classes: class 1 must be a non-blank string, got None"),
    ],
)
def test_bad_class_lists_are_refused_before_the_model_loads(runs, monkeypatch, tmp_path, classes, message):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the class list was checked")

    monkeypatch.setattr(ovss_predict, "load_ovss_model", must_not_load)
    with pytest.raises(DatasetError) as error:
        predict_to_folder(runs["folder"] / "checkpoint", runs["folder"] / "scene.png", classes, tmp_path / "out")
    assert str(error.value).startswith(message)
    assert not (tmp_path / "out").exists()


def test_distinct_names_pass():
    assert check_user_classes(["red circle", "red square", "tv, television", "television"]) == (
        "red circle", "red square", "tv, television", "television"
    )  # fmt: skip
    assert check_user_classes("red circle") == ("red circle",)


class _BadLabels(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        raise DatasetError("/data/labels/b.png: label values 7 are outside the 3 classes (0..2) and not the ignore value 255")


def test_an_error_raised_in_a_loader_worker_is_one_line_naming_the_file(capsys):
    """torch re-raises a worker's error with the worker's traceback as its message; the script shows the original line."""

    @reports_errors
    def main() -> None:
        list(torch.utils.data.DataLoader(_BadLabels(), num_workers=1))

    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "error: /data/labels/b.png: label values 7 are outside the 3 classes (0..2) and not the ignore value 255\n"
    )


def test_sliding_window_sizes_that_leave_pixels_uncovered_are_refused():
    with pytest.raises(ConfigError, match=r"eval.out_size=640: windows of 256 with stride 170 do not cover it; .* e.g. 596"):
        check_sliding_window(256, 0.333, 640)
    with pytest.raises(ConfigError, match="eval.overlap=1.0"):
        check_sliding_window(384, 1.0, 640)
    check_sliding_window(384, 0.333, 640)  # CAT-Seg's: crops at 0 and 256 end at 640
    probabilities = sliding_window_inference(
        lambda crops: torch.sigmoid(crops[:, :2] / 255), torch.rand(3, 50, 70) * 255, window=256, overlap=0.333, out_size=596
    )
    assert torch.isfinite(probabilities).all()
