"""scripts/predict.py and scripts/info.py (and eval.py's model settings) as a user runs them (subprocesses): outputs,
counts, one-line errors."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from ssp_sam.checkpoint import save_checkpoint
from ssp_sam.data.shapeworld import generate_dataset
from ssp_sam.export import write_predictions
from ssp_sam.predictor import Prediction
from ssp_sam.visualize import MASK_COLOUR

from conftest import REPO, run_script
from test_predictor import half_foreground_predictor

HEIGHT, WIDTH = 37, 61
EXPRESSIONS = ["the red circle", "a blue star on the left", "it"]


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """An image, a tiny checkpoint whose masks for it are about half the picture, and the in-process predictor."""
    folder = tmp_path_factory.mktemp("scene")
    image = np.random.default_rng(3).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    Image.fromarray(image).save(folder / "scene.png")
    predictor = half_foreground_predictor(image)
    save_checkpoint(predictor.model, folder / "checkpoint")
    return {"folder": folder, "image": image, "predictor": predictor}


def _predict_args(scene, out_dir: Path, *overrides: str) -> list[str]:
    expressions = "[" + ", ".join(EXPRESSIONS) + "]"
    defaults = {
        "image": str(scene["folder"] / "scene.png"),
        "expressions": expressions,
        "checkpoint": str(scene["folder"] / "checkpoint"),
        "out_dir": str(out_dir),
        "device": "cpu",
    }
    for override in overrides:
        key, _, value = override.partition("=")
        defaults[key] = value
    return [f"{key}={value}" for key, value in defaults.items()]


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools under numpy 2
def test_predict_writes_masks_overlays_and_summary(scene, tmp_path):
    out_dir = tmp_path / "preds"
    result = run_script("predict.py", *_predict_args(scene, out_dir))
    assert result.returncode == 0, result.stderr
    assert "shipped ShapeWorld model" not in result.stderr
    expected_files = {f"{i:02d}_{kind}.png" for i in range(len(EXPRESSIONS)) for kind in ("mask", "overlay")}
    assert {p.name for p in out_dir.iterdir()} == expected_files | {"summary.json", "predictions.jsonl"}

    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["image"] == str(scene["folder"] / "scene.png")
    lines = [json.loads(line) for line in (out_dir / "predictions.jsonl").read_text().splitlines()]
    assert [line["expression"] for line in lines] == EXPRESSIONS
    assert [line["rle"] for line in lines] == [entry["rle"] for entry in summary["predictions"]]
    in_process = scene["predictor"].predict(scene["image"], EXPRESSIONS)
    assert [p["expression"] for p in summary["predictions"]] == EXPRESSIONS
    for index, (entry, expected) in enumerate(zip(summary["predictions"], in_process)):
        assert entry["mask"] == f"{index:02d}_mask.png" and entry["overlay"] == f"{index:02d}_overlay.png"
        png = np.asarray(Image.open(out_dir / entry["mask"]))
        assert png.shape == (HEIGHT, WIDTH) and set(np.unique(png)) <= {0, 255}
        mask = png == 255
        decoded = mask_utils.decode({"size": entry["rle"]["size"], "counts": entry["rle"]["counts"].encode("ascii")})
        np.testing.assert_array_equal(decoded.astype(bool), mask)
        np.testing.assert_array_equal(mask, expected.mask)
        assert 0 < entry["area"] == mask.sum() < HEIGHT * WIDTH
        np.testing.assert_allclose(entry["box_xyxy"], expected.box, atol=0.01)
        assert entry["score"] == pytest.approx(expected.score, abs=1e-4)
        assert entry["no_target"] is expected.no_target is False

        overlay = np.asarray(Image.open(out_dir / entry["overlay"]).convert("RGB")).astype(int)
        assert overlay.shape[1] == WIDTH and overlay.shape[0] >= HEIGHT
        blend = (0.5 * scene["image"] + 0.5 * np.asarray(MASK_COLOUR)).astype(int)
        tinted = np.abs(overlay[:HEIGHT, :WIDTH] - blend).max(-1) <= 1
        assert tinted[mask].mean() > 0.8  # the box outline covers the rest
    assert f"{len(EXPRESSIONS)} masks" in result.stdout


def _release_counts(name: str) -> tuple[int, int]:
    """Parameter counts of a released SSP-SAM from its key list (tests/data), not from our code.

    trainable: every released tensor outside the two encoders except SAM's prompt encoder and the
    two modules the release never uses; release grouping (the paper's count): every tensor except
    SAM's prompt encoder (frozen) and img2img_attn's relative-position tables (buffers).
    """
    keys = json.loads((REPO / "tests" / "data" / f"{name}_checkpoint_keys.json").read_text())
    unused = ("sam.prompt_encoder.", "img2img_attn.", "norm_text_cond_img.")
    trainable = sum(math.prod(shape) for key, shape in keys.items() if not key.startswith(unused))
    frozen_or_buffers = ("sam.prompt_encoder.", "img2img_attn.pos_x", "img2img_attn.pos_y")
    grouping = sum(math.prod(shape) for key, shape in keys.items() if not key.startswith(frozen_or_buffers))
    return trainable, grouping


def test_info_counts_match_the_release_key_lists():
    assert _release_counts("ssp_sam_224") == (18_109_931, 18_373_611)  # the paper's 18.37 M
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = dict(zip(("224", "336"), pool.map(lambda name: run_script("info.py", f"model=ssp_sam_{name}"), ("224", "336"))))
    for name, run in runs.items():
        assert run.returncode == 0, run.stderr
        headline, line = run.stdout.strip().splitlines()[-2:]
        counts = json.loads(line)
        trainable, grouping = _release_counts(f"ssp_sam_{name}")
        assert counts["model"] == f"ssp_sam_{name}"
        assert (counts["trainable_params"], counts["params_release_grouping"]) == (trainable, grouping)
        assert headline.startswith(f"ssp_sam_{name}: {grouping:,} parameters ({grouping / 1e6:.2f} M) in the release's grouping")
    assert json.loads(runs["336"].stdout.splitlines()[-1])["total_params"] > json.loads(runs["224"].stdout.splitlines()[-1])["total_params"]


def _bad_inputs(folder: Path) -> dict[str, tuple[tuple[str, ...], str]]:
    """Case -> (overrides of the good command, text the one-line error must contain)."""
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("not pixels\n")
    sam_style = folder / "sam_vit_b.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(4, 3, 16, 16)}, sam_style)
    return {
        "missing image": ((f"image={folder / 'nowhere.png'}",), f"{folder / 'nowhere.png'}: image file not found"),
        "zero-byte image": ((f"image={folder / 'empty.png'}",), f"{folder / 'empty.png'}: image file is empty"),
        "not an image": ((f"image={folder / 'notes.png'}",), f"{folder / 'notes.png'}: not a readable image"),
        "blank expression": (('expressions=[" "]',), "expression 0"),
        "SAM weights as checkpoint": ((f"checkpoint={sam_style}",), f"{sam_style}: not an SSP-SAM release checkpoint"),
        "missing checkpoint dir": ((f"checkpoint={folder / 'no_such_run'}",), f"{folder / 'no_such_run'}: checkpoint not found"),
        # Hydra reads these unquoted as null, a bool, a number, a list: they were segmented as 'None', 'True', ...
        "null expression": (("expressions=[null]",), "expressions: item 0 is None, not text"),
        "boolean expression": (("expressions=[the red circle, true, 2.5]",), "expressions: item 1 is True, not text"),
        "list expression": (("expressions=[[a, b]]",), "expressions: item 0 is ['a', 'b'], not text"),
        # null: a TypeError traceback after the model ran; empty: written into the current directory
        "null out_dir": (("out_dir=null",), "out_dir: give the folder to write into (got null)"),
        "empty out_dir": (("out_dir=",), "out_dir: give the folder to write into (got an empty path)"),
        "mps device": (("device=mps",), "device: 'mps' is not supported here"),
        "preset without checkpoint": (("model=tiny", "checkpoint=null"), "checkpoint: give the checkpoint that goes with model=tiny"),
    }


@pytest.fixture(scope="module")
def bad_runs(scene, tmp_path_factory):
    """Every bad-input case run once (two at a time: each run is mostly Python start-up)."""
    folder = tmp_path_factory.mktemp("bad")
    cases = _bad_inputs(folder)
    cases["unknown key"] = (("foo=1",), "foo")

    def run(item):
        name, (overrides, _) = item
        out_dir = folder / ("out_" + name.replace(" ", "_"))
        cwd = folder / ("cwd_" + name.replace(" ", "_"))  # out_dir= (empty) wrote here
        cwd.mkdir()
        return name, out_dir, cwd, run_script("predict.py", *_predict_args(scene, out_dir, *overrides), cwd=cwd)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return {name: (cases[name][1], out_dir, cwd, result) for name, out_dir, cwd, result in pool.map(run, cases.items())}


@pytest.mark.parametrize(
    "case",
    [
        "missing image", "zero-byte image", "not an image", "blank expression", "SAM weights as checkpoint",
        "missing checkpoint dir", "null expression", "boolean expression", "list expression",
        "null out_dir", "empty out_dir", "mps device", "preset without checkpoint",
    ],
)  # fmt: skip
def test_predict_bad_input_is_one_line_error(bad_runs, case):
    expected, out_dir, cwd, result = bad_runs[case]
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("checkpoint: not given")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0]
    assert not out_dir.exists() and not any(cwd.iterdir())


def test_predict_unknown_config_key_is_hydras_error(bad_runs):
    _, out_dir, _, result = bad_runs["unknown key"]
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "'foo'" in result.stderr
    assert not out_dir.exists()


def test_a_new_export_replaces_the_previous_one_and_nothing_else(tmp_path):
    """Three expressions, then one, into the same folder: only the new files and the user's remain."""
    image = np.zeros((4, 6, 3), dtype=np.uint8)

    def prediction(text: str) -> Prediction:
        mask = np.zeros((4, 6), dtype=bool)
        mask[1:3, 2:5] = True
        return Prediction(
            expression=text, mask=mask, logits=mask.astype(np.float32), box=np.array([2.0, 1.0, 5.0, 3.0]), score=0.9,
            no_target=False, padded_area=6, padded_logits=np.zeros((2, 2), np.float32),
        )

    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "07_mask.png").write_bytes(b"a user's file that looks like ours but no summary of ours names")
    write_predictions(image, [prediction(t) for t in ("a", "b", "c")], tmp_path, "scene.png", "tiny")
    assert (tmp_path / "02_overlay.png").exists()
    summary = write_predictions(image, [prediction("d")], tmp_path, "scene.png", "tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00_mask.png", "00_overlay.png", "07_mask.png", "notes.txt", "predictions.jsonl", "summary.json"
    ]
    assert [p["expression"] for p in summary["predictions"]] == ["d"]
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 1


def test_predict_without_checkpoint_says_it_runs_the_shipped_shapeworld_model(scene, tmp_path):
    """The default model knows synthetic shape scenes only: a user's photo gets masks, and a line saying whose."""
    result = run_script("predict.py", *_predict_args(scene, tmp_path / "preds", "checkpoint=null"))
    assert result.returncode == 0, result.stderr
    assert "checkpoint: not given, using the shipped ShapeWorld model" in result.stderr


def test_predict_takes_one_model_setting_without_a_preset(scene, tmp_path):
    """model.no_target_pixels=N alone (no model=<preset>), as the README documents: the masks of about half the
    picture are "no target" under a threshold larger than the frame; a setting the checkpoint defines is refused in
    one line naming it (both were Hydra's multi-line "Key 'model' is not in struct" with exit 1)."""
    out_dir = tmp_path / "preds"
    result = run_script("predict.py", *_predict_args(scene, out_dir), "model.no_target_pixels=100000")
    assert result.returncode == 0, result.stderr
    summary = json.loads((out_dir / "summary.json").read_text())
    assert [entry["no_target"] for entry in summary["predictions"]] == [True] * len(EXPRESSIONS)
    result = run_script("predict.py", *_predict_args(scene, tmp_path / "refused"), "model.append_period=false")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert "model settings differ from the checkpoint's own config.json (append_period: True -> False)" in lines[0]


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools under numpy 2
def test_predict_takes_one_model_setting_for_the_shipped_model(scene, tmp_path):
    """model.no_target_pixels=N without checkpoint= applies to the shipped model (it was refused with "give the
    checkpoint that goes with model=..."); model=<preset> without checkpoint= stays refused (bad_runs)."""
    out_dir = tmp_path / "preds"
    overrides = ("checkpoint=null", "expressions=[the red circle]", "model.no_target_pixels=1000000")
    result = run_script("predict.py", *_predict_args(scene, out_dir, *overrides))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "using the shipped ShapeWorld model" in result.stderr
    summary = json.loads((out_dir / "summary.json").read_text())
    assert [entry["no_target"] for entry in summary["predictions"]] == [True]


def test_eval_takes_one_model_setting_for_the_shipped_model(tmp_path):
    """eval.py as predict.py: model.<key>=v without checkpoint= reaches the shipped model's config (a bad value is
    refused there, naming the key), while model=<preset> without checkpoint= is refused naming the preset."""
    generate_dataset(tmp_path / "data", "res", {"val": 1}, seed=1, progress=False)
    common = ("dataset=shapeworld", f"dataset.root={tmp_path / 'data'}", "dataset.split=val", "device=cpu", "progress=false", "workers=0")
    with ThreadPoolExecutor(max_workers=2) as pool:
        setting, preset = pool.map(lambda extra: run_script("eval.py", *common, extra), ("model.no_target_pixels=0", "model=tiny"))
    assert setting.returncode == 2, setting.stderr[-2000:]
    assert setting.stderr.strip().splitlines() == ["error: model.no_target_pixels: must be >= 1, got 0"]
    assert preset.returncode == 2, preset.stderr[-2000:]
    assert preset.stderr.strip().splitlines() == [
        "error: checkpoint: give the checkpoint that goes with model=tiny (our directory or a released .pth)"
    ]
