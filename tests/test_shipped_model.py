"""The shipped ShapeWorld model: present, small, and no worse than what the README reports.

The model's reference numbers are the results files in its checkpoint directory
(``results_shapeworld_test.json``, ``results_shapeworld_gres_test.json``), written by the
README's evaluation command on a 200-image split of seed 99. Here the model is evaluated on a
fresh 40-image split of another seed; CI fails when it drops more than 0.05 below its reference
numbers (a regression) or, for the issue's targets, more than 0.05 below the targets.
"""

from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from ssp_sam.data.registry import load_dataset
from ssp_sam.data.shapeworld import dataset_config, generate_dataset
from ssp_sam.engine.evaluator import evaluate
from ssp_sam.image_io import load_image
from ssp_sam.predictor import DEFAULT_CHECKPOINT, Predictor

from conftest import REPO

CHECK_SEED = 424242  # neither a training seed (7, 1000), the README's (99) nor the demo's
N_IMAGES = 40
MARGIN = 0.05
# The targets: RES mIoU overall and on L and R; GRES gIoU and N-acc.
TARGETS = {"res": {"mIoU": 0.85, "L": 0.75, "R": 0.75}, "gres": {"gIoU": 0.80, "N-acc": 0.85}}
# Which targets the shipped model reaches on the README's split: GRES (gIoU 86.0, N-acc 91.0), not yet all of RES
# (mIoU 84.5 against 85; L 77.9 and R 84.1 reach theirs; README, "What limits the model"). A reached target is checked for real, the others are
# expected failures until a model reaches them (RES may pass here within the margin: not strict).
TARGETS_REACHED = {"res": False, "gres": True}


@pytest.fixture(scope="module")
def predictor():
    return Predictor.from_checkpoint(device="cpu")


@pytest.fixture(scope="module")
def results(predictor, tmp_path_factory):
    root = tmp_path_factory.mktemp("shapeworld_check")
    found = {}
    for task in ("res", "gres"):
        generate_dataset(root, task, {"test": N_IMAGES}, seed=CHECK_SEED, progress=False)
        found[task] = evaluate(predictor, load_dataset(dataset_config(root, task)), progress=False)
    return found


def _headline(result, task: str) -> dict[str, float]:
    if task == "res":
        return {"mIoU": result.metrics["mIoU"], "L": result.by_group["L"]["mIoU"], "R": result.by_group["R"]["mIoU"]}
    return {"gIoU": result.metrics["gIoU"], "N-acc": result.metrics["N-acc"]}


def _reference(task: str) -> dict[str, float]:
    name = "shapeworld" if task == "res" else "shapeworld_gres"
    record = json.loads((DEFAULT_CHECKPOINT / f"results_{name}_test.json").read_text())
    if task == "res":
        return {"mIoU": record["metrics"]["mIoU"], "L": record["by_group"]["L"]["mIoU"], "R": record["by_group"]["R"]["mIoU"]}
    return {"gIoU": record["metrics"]["gIoU"], "N-acc": record["metrics"]["N-acc"]}


def test_shipped_checkpoint_is_small_and_self_contained():
    files = list(DEFAULT_CHECKPOINT.iterdir())
    assert {f.name for f in files} >= {"model.safetensors", "config.json"}
    assert sum(f.stat().st_size for f in files) < 30 * 2**20
    config = json.loads((DEFAULT_CHECKPOINT / "config.json").read_text())["model"]
    assert config["clip_checkpoint"] is None and config["sam_checkpoint"] is None  # encoders embedded


@pytest.mark.parametrize("task", ["res", "gres"])
def test_no_regression_against_the_reported_numbers(results, task):
    measured, reference = _headline(results[task], task), _reference(task)
    for key, value in reference.items():
        assert measured[key] >= value - MARGIN, (task, key, measured, reference)


@pytest.mark.parametrize("task", [
    pytest.param(task, marks=[] if reached else pytest.mark.xfail(reason=f"the shipped model does not reach the {task} targets yet"))
    for task, reached in TARGETS_REACHED.items()
])
def test_targets(results, task):
    measured = _headline(results[task], task)
    for key, target in TARGETS[task].items():
        assert measured[key] >= target - MARGIN, (task, key, measured)


def _demo_module():
    spec = importlib.util.spec_from_file_location("demo_script", REPO / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo


@pytest.fixture(scope="module")
def demo_example(tmp_path_factory):
    """The demo's step 3 input: its GRES split (seed and size as scripts/demo.py makes them) and its pick."""
    demo = _demo_module()
    root = tmp_path_factory.mktemp("demo")
    generate_dataset(root, "gres", {"test": 40}, seed=demo.DEMO_SEED, progress=False)
    dataset = load_dataset(dataset_config(root, "gres"))
    return demo, dataset, *demo.pick_example(dataset)


def test_demo_picks_one_sentence_of_each_kind_with_its_annotation(demo_example):
    demo, dataset, image_path, examples = demo_example
    assert [kind for kind, _, _ in examples] == ["A", "L", "R", "M", "N"]
    for kind, text, annotated in examples:
        owners = [(s, i) for s, i in dataset.per_sentence() if s.image_path == image_path and s.expressions[i] == text]
        assert owners and all(s.sentence_meta(i)["kind"] == kind for s, i in owners), (kind, text)
        assert np.array_equal(annotated, owners[0][0].mask())
        assert annotated.any() == (kind != "N")
        instances = {"N": range(0, 1), "M": range(2, 99)}.get(kind, range(1, 2))  # none, several, one
        assert len(owners[0][0].ann_ids) in instances, (kind, owners[0][0].ann_ids)


def test_demo_agreement_is_iou_at_half_or_no_target_said():
    demo = _demo_module()
    annotated = np.zeros((4, 4), bool)
    annotated[:2] = True  # 8 px
    half = np.zeros((4, 4), bool)
    half[:1] = True  # 4 px inside: IoU 0.5
    assert demo.agreement(SimpleNamespace(mask=half, no_target=False), annotated)[0]
    assert not demo.agreement(SimpleNamespace(mask=half[::-1].copy(), no_target=False), annotated)[0]  # IoU 0
    nothing = np.zeros((4, 4), bool)
    assert demo.agreement(SimpleNamespace(mask=nothing, no_target=True), nothing) == (True, "annotated: no target")
    assert not demo.agreement(SimpleNamespace(mask=half, no_target=False), nothing)[0]


@pytest.fixture(scope="module")
def demo_step_3(demo_example, predictor, tmp_path_factory):
    """scripts/demo.py's step 3 on the shipped model: (verdicts, output folder)."""
    demo, _, image_path, examples = demo_example
    out_dir = tmp_path_factory.mktemp("demo_predictions")
    return demo.segment_one_of_each_kind(predictor, image_path, examples, out_dir, "shipped"), out_dir


def test_demo_overview_shows_each_expressions_mask_in_order(demo_example, demo_step_3):
    demo, _, image_path, examples = demo_example
    verdicts, out_dir = demo_step_3
    image = load_image(image_path)
    height, width = image.shape[:2]
    sheet = np.asarray(Image.open(out_dir / demo.OVERVIEW_FILE).convert("RGB"))
    assert len(verdicts) == len(examples) == 5
    assert sheet.shape[1] == 5 * width + 4 * 4
    for index in range(5):
        tile = sheet[:height, index * (width + 4): index * (width + 4) + width]
        mask = np.asarray(Image.open(out_dir / f"{index:02d}_mask.png")) > 0
        assert np.array_equal(np.any(tile != image, axis=-1), mask), index  # tinted exactly where its mask is


@pytest.mark.xfail(not all(TARGETS_REACHED.values()), reason="the shipped model does not reach the issue's targets yet", strict=False)
def test_demo_overlays_show_the_right_objects(demo_step_3):
    """Item 5 of the issue: every one of the demo's five expressions is answered right by the shipped model."""
    verdicts, _ = demo_step_3
    assert all(verdicts), verdicts
