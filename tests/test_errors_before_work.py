"""Bad outputs and options stop the scripts before any work, with one line naming the key or file, exit 2.

Each case also contains a second problem that only work would reach (a dataset that does not exist,
a results file that is missing): the error must be about the first, which proves the order.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from ssp_sam.checkpoint import save_checkpoint
from ssp_sam.config import model_config_from
from ssp_sam.data.shapeworld import generate_dataset
from ssp_sam.engine.train_config import train_run_config_from
from ssp_sam.errors import ConfigError
from ssp_sam.outputs import check_output_dir, check_output_file

from conftest import REPO, run_script, tiny_model

GOOD_TRAIN = {"epochs": 2, "batch_size": 4, "workers": 0, "lr": 1e-4, "decoder_lr": 0.0, "grad_clip": 0.1, "max_steps_per_epoch": 3,
              "warmup_epochs": 0}


def _huge_png(path: Path) -> None:
    """A PNG announcing 14000 x 14000 pixels (the data cut short): Image.open sees its size."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 14000, 14000, 8, 2, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def _cases(folder: Path) -> dict[str, tuple[str, tuple[str, ...], str]]:
    """Case -> (script, arguments, the text of the one error line)."""
    (folder / "a_file").write_text("not a folder\n")
    (folder / "a_dir").mkdir()
    Image.new("RGB", (8, 8)).save(folder / "scene.png")
    Image.new("RGB", (8000, 1)).save(folder / "strip.png")
    _huge_png(folder / "huge.png")
    save_checkpoint(tiny_model(), folder / "tiny")
    file, under_file, nowhere = folder / "a_file", folder / "a_file" / "out", folder / "no_such_data"
    results = folder / "results.json"
    results.write_text(json.dumps({"metrics": {"mIoU": 0.5, "oIoU": 0.4, "n_samples": 3}, "dataset": "refcoco",
                                   "split": "val", "protocol": "standard", "task": "res", "label": "ours"}))
    predict = ("image=" + str(folder / "scene.png"), "expressions=[the circle]", f"checkpoint={folder / 'no_such_checkpoint'}", "device=cpu")
    evaluate = ("dataset=shapeworld", f"dataset.root={nowhere}", "device=cpu", "progress=false")
    train = ("model=tiny", "dataset=shapeworld", f"dataset.root={nowhere}", f"run_dir={folder / 'run'}", "device=cpu")
    return {
        "predict out_dir under a file": ("predict.py", (*predict, f"out_dir={under_file}"), f"out_dir={under_file}: {file} is a file"),
        "predict without image": ("predict.py", ("expressions=[the circle]", "device=cpu"), "image: missing; give image="),
        "predict without expressions": ("predict.py", (f"image={folder / 'scene.png'}", "device=cpu"), "expressions: missing; give expressions="),
        "predict 14000x14000 image": (
            "predict.py", (*predict[1:], f"image={folder / 'huge.png'}", f"out_dir={folder / 'out'}"), f"{folder / 'huge.png'}: too large to decode safely"),
        "predict 8000x1 image": (
            "predict.py", (*predict[1:3], f"checkpoint={folder / 'tiny'}", f"image={folder / 'strip.png'}", f"out_dir={folder / 'out'}"),
            f"{folder / 'strip.png'}: a 8000x1 image is too elongated"),
        "eval metrics_out under a file": ("eval.py", (*evaluate, f"metrics_out={under_file}"), f"metrics_out={under_file}: {file} is a file"),
        "eval without checkpoint off ShapeWorld": (
            "eval.py", ("dataset=refcoco", f"dataset.root={nowhere}", "device=cpu"),
            "checkpoint: not given, and the default (the shipped ShapeWorld model"),
        "eval samples_out is a directory": ("eval.py", (*evaluate, f"samples_out={folder / 'a_dir'}"), f"samples_out={folder / 'a_dir'}: is a directory"),
        "table --out-md under a file": ("make_table.py", (str(folder / "missing.json"), "--out-md", str(under_file)), f"--out-md={under_file}: {file} is a file"),
        "table unknown --metric": ("make_table.py", (str(results), "--metric", "mIOU"), "--metric mIOU: not a metric of these results; they have mIoU, oIoU"),
        "train batch_size=0": ("train.py", (*train, "train.batch_size=0"), "train.batch_size=0: must be an integer >= 1"),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every case run once, two at a time (each run is mostly Python start-up)."""
    folder = tmp_path_factory.mktemp("errors")
    cases = _cases(folder)

    def run(item):
        name, (script, arguments, _) = item
        return name, run_script(script, *arguments, cwd=folder)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return {name: (cases[name][2], result) for name, result in pool.map(run, cases.items())}


CASES = [
    "predict out_dir under a file", "predict without image", "predict without expressions", "predict 14000x14000 image",
    "predict 8000x1 image", "eval metrics_out under a file", "eval samples_out is a directory", "table --out-md under a file",
    "table unknown --metric", "train batch_size=0",
]


@pytest.mark.parametrize("case", CASES)
def test_one_line_naming_the_problem_exit_2(runs, case):
    expected, result = runs[case]
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("batch_size", 0, "train.batch_size=0: must be an integer >= 1"),
        ("batch_size", 2.5, "train.batch_size=2.5: must be an integer >= 1"),
        ("batch_size", True, "train.batch_size=True: must be an integer >= 1"),
        ("lr", "abc", "train.lr=abc: must be a number >= 0"),
        ("lr", float("nan"), "train.lr=nan: must be a number >= 0"),
        ("workers", -1, "train.workers=-1: must be an integer >= 0"),
        ("workers", "2.0", "train.workers=2.0: must be an integer >= 0"),
        ("epochs", None, "train.epochs=None: must be an integer >= 1"),
        ("max_steps_per_epoch", 0, "train.max_steps_per_epoch=0: must be an integer >= 1 (or null)"),
    ],
)
def test_bad_train_options_are_named(key, value, message, tmp_path):
    with pytest.raises(ConfigError) as error:
        train_run_config_from({"run_dir": str(tmp_path), "train": {**GOOD_TRAIN, key: value}})
    assert str(error.value) == message


def test_good_train_options_pass(tmp_path):
    config = train_run_config_from({"run_dir": str(tmp_path), "train": GOOD_TRAIN})
    assert (config.train.batch_size, config.train.max_steps_per_epoch) == (4, 3)
    text = {**GOOD_TRAIN, "lr": "1e-4", "workers": "2", "grad_clip": None, "max_steps_per_epoch": None}
    config = train_run_config_from({"run_dir": str(tmp_path), "train": text})
    assert (config.train.lr, config.train.workers, config.train.grad_clip, config.train.max_steps_per_epoch) == (1e-4, 2, None, None)


def test_output_paths(tmp_path):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_dir").mkdir()
    check_output_file(tmp_path / "new" / "deeper" / "results.json", "metrics_out")  # folders are made later
    check_output_file(tmp_path / "a_file", "metrics_out")  # replaced
    check_output_dir(tmp_path / "a_dir", "out_dir")
    check_output_dir(tmp_path / "new" / "out", "out_dir")
    check_output_file(None, "samples_out")
    for check, path, message in [
        (check_output_file, tmp_path / "a_dir", f"metrics_out={tmp_path / 'a_dir'}: is a directory; give a file name"),
        (check_output_file, tmp_path / "a_file" / "x" / "r.json", f"metrics_out={tmp_path / 'a_file' / 'x' / 'r.json'}: {tmp_path / 'a_file'} is a file"),
        (check_output_dir, tmp_path / "a_file", f"metrics_out={tmp_path / 'a_file'}: is a file; give a folder"),
        (check_output_dir, tmp_path / "a_file" / "out", f"metrics_out={tmp_path / 'a_file' / 'out'}: {tmp_path / 'a_file'} is a file"),
    ]:
        with pytest.raises(ConfigError) as error:
            check(path, "metrics_out")
        assert str(error.value).startswith(message)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_folder_is_named(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = run_script("make_table.py", str(tmp_path / "missing.json"), "--out-md", str(locked / "table.md"))
    finally:
        locked.chmod(0o755)
    assert result.returncode == 2 and f"the folder {locked} is not writable" in result.stderr


def test_check_data_reports_every_problem_in_one_run(tmp_path):
    """A missing image, a truncated one (its header is intact) and a polygon outside its image: all three."""
    generate_dataset(tmp_path, "res", {"val": 3}, seed=1, progress=False)
    instances = tmp_path / "shapeworld" / "instances.json"
    annotations = json.loads(instances.read_text())
    first = annotations["annotations"][0]
    first["segmentation"] = [[-30, 10, 100, 10, 100, 400, -30, 400]]  # the image is 256 x 256
    instances.write_text(json.dumps(annotations))
    truncated = tmp_path / "images" / "shapeworld_val_000001.png"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    (tmp_path / "images" / "shapeworld_val_000002.png").unlink()
    result = run_script("check_data.py", "dataset=shapeworld", f"dataset.root={tmp_path}", "dataset.split=val")
    assert result.returncode == 1, result.stderr
    problems = [line for line in result.stdout.splitlines() if "PROBLEM" in line]
    assert len(problems) == 3, result.stdout
    assert "shapeworld_val_000002.png" in problems[0] and "missing" in problems[0]
    assert f"unreadable or truncated: {truncated}" in problems[1]
    assert problems[2].endswith(f"outside their image (cropped when decoded): instances.json annotation {first['id']}")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"no_target_pixels": 0}, "model.no_target_pixels: must be >= 1, got 0"),
        ({"no_target_pixels": -7}, "model.no_target_pixels: must be >= 1, got -7"),
        ({"no_target_pixels": 0.5}, "model config: invalid key 'no_target_pixels': Value '0.5' of type 'float' could not be converted to Integer"),
        ({"adapters": {"dim": "abc"}}, "model config: invalid key 'adapters.dim': Value 'abc' of type 'str' could not be converted to Integer"),
        ({"adapters": {"typo": 1}}, "model config: invalid key 'adapters.typo': Key 'typo' not in 'AdapterConfig'"),
    ],
)
def test_bad_model_values_are_one_line_naming_the_key(overrides, message):
    """A no-target threshold below 1 makes "no target" impossible (GRES N-acc 0 by construction, exit 0), so it is
    refused like any wrong type or unknown key: one line naming the key, without OmegaConf's full_key lines."""
    with pytest.raises(ConfigError) as error:
        model_config_from(None, **overrides)
    assert str(error.value) == message


@pytest.fixture(scope="module")
def tiny_eval(tmp_path_factory) -> tuple[str, ...]:
    """eval.py's arguments for the tiny model on two ShapeWorld scenes."""
    folder = tmp_path_factory.mktemp("eval")
    generate_dataset(folder / "data", "res", {"val": 2}, seed=1, progress=False)
    save_checkpoint(tiny_model(), folder / "tiny")
    return ("dataset=shapeworld", f"dataset.root={folder / 'data'}", "dataset.split=val", f"checkpoint={folder / 'tiny'}",
            "device=cpu", "progress=false", "workers=0")


def test_eval_unresolvable_dataset_value_is_one_line_naming_it(tiny_eval):
    result = run_script("eval.py", *tiny_eval, "dataset.root=${oc.env:SSP_SAM_TEST_UNSET_VARIABLE}")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("error: dataset.root: cannot be resolved (") and "SSP_SAM_TEST_UNSET_VARIABLE" in lines[0], lines[0]


def test_eval_takes_one_model_setting_without_a_preset(tiny_eval):
    """model.no_target_pixels=N alone (no model=<preset>), as the README documents: it reaches the checkpoint's model
    config (a bad value is refused there in one line) and a good one evaluates, where Hydra refused the key."""
    result = run_script("eval.py", *tiny_eval, "model.no_target_pixels=0")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines == ["error: model.no_target_pixels: must be >= 1, got 0"], result.stderr[-2000:]
    result = run_script("eval.py", *tiny_eval, "model.no_target_pixels=3")
    assert result.returncode == 0 and "shapeworld val" in result.stdout, result.stderr[-2000:]
