"""OVSS prediction (ssp_sam/ovss/predict.py, scripts/predict.py with an OVSS checkpoint): the label map is the
argmax of the model's probabilities in the original image's frame, the files agree with it and with each other."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image
from torch import Tensor, nn

from ssp_sam.data.shapeworld import UNSEEN_CLASSES
from ssp_sam.errors import ConfigError
from ssp_sam.ovss import predict as ovss_predict
from ssp_sam.ovss.build import build_ovss_model
from ssp_sam.ovss.engine.checkpoint import load_ovss_model, save_ovss_checkpoint
from ssp_sam.ovss.predict import OVSSPrediction, OVSSPredictor, predict_to_folder, write_ovss_prediction
from ssp_sam.visualize import LEGEND_SWATCH

from conftest import REPO, run_script

CLASSES = ["red circle", "blue square", "background"]
HEIGHT, WIDTH = 45, 70  # not square, larger than the tiny model's 64 (sliding) in width


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny SAM-MI (random weights, seed 0) saved as a checkpoint, a picture, and the model in eval mode."""
    folder = tmp_path_factory.mktemp("ovss")
    torch.manual_seed(0)
    model = build_ovss_model(OmegaConf.load(REPO / "configs" / "ovss_model" / "tiny.yaml")).eval()
    save_ovss_checkpoint(model, folder / "checkpoint", CLASSES)
    image = np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    Image.fromarray(image).save(folder / "scene.png")
    return {"folder": folder, "model": model, "image": image}


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@torch.inference_mode()
def reference_probabilities(model, image: np.ndarray, names: list[str], sliding: bool) -> Tensor:
    """(T, H, W), written out plainly: CAT-Seg's sliding window as loops over crop offsets, each crop alone.

    Sliding: the image first resized as detectron2's test mapper does (short side to window + stride, 64 + 42
    = 106 for the tiny model: 45 x 70 -> 106 x 165, antialiased), then to 106 x 106, the window at every offset
    0, stride, ... in both axes, probabilities summed and divided by how many crops cover a pixel, averaged
    1:1 with the whole image seen at window size, then resized to the image. Whole: resized to the window
    with antialiasing (downscaling averages, as the evaluator's resize does), probabilities resized back.
    """
    window = model.image_size
    text = model.encode_classes(names)
    pixels = torch.from_numpy(image).permute(2, 0, 1).float()[None]
    height, width = image.shape[:2]
    if not sliding:  # the evaluator's whole-image protocol: an antialiased resize (as PIL's) to the window
        square = F.interpolate(pixels, size=(window, window), mode="bilinear", align_corners=False, antialias=True)
        return _resize(model.predict(square, text), (height, width))[0]
    stride = int(window * (1 - 0.333))
    side = window + stride
    assert (height, width, side) == (45, 70, 106)
    pixels = F.interpolate(pixels, size=(106, 165), mode="bilinear", align_corners=False, antialias=True)
    global_view = model.predict(_resize(pixels, (window, window)), text)
    resized = _resize(pixels, (side, side))
    total, covered = torch.zeros(len(names), side, side), torch.zeros(side, side)
    for top in range(0, side - window + 1, stride):
        for left in range(0, side - window + 1, stride):
            crop = resized[:, :, top : top + window, left : left + window]
            total[:, top : top + window, left : left + window] += model.predict(crop, text)[0]
            covered[top : top + window, left : left + window] += 1
    averaged = (total / covered + _resize(global_view, (side, side))[0]) / 2
    return _resize(averaged[None], (height, width))[0]


@pytest.mark.parametrize("inference", ["sliding", "whole"])
def test_label_map_is_the_argmax_of_the_probabilities_in_the_image_frame(tiny, inference):
    predictor = OVSSPredictor(tiny["model"], "cpu", inference=inference)
    prediction = predictor.predict(tiny["image"], CLASSES)
    expected = reference_probabilities(tiny["model"], tiny["image"], CLASSES, sliding=inference == "sliding")

    assert prediction.inference == inference
    assert prediction.probabilities.shape == (len(CLASSES), HEIGHT, WIDTH) == tuple(expected.shape)
    np.testing.assert_allclose(prediction.probabilities, expected.numpy(), atol=1e-5)  # batched crops vs one at a time
    top2 = expected.topk(2, dim=0).values
    clear = (top2[0] - top2[1]).numpy() > 1e-4  # pixels where a 1e-5 difference cannot swap the winner
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(prediction.label_map[clear], expected.argmax(dim=0).numpy()[clear])
    assert len(np.unique(prediction.label_map)) >= 2  # the check means something: more than one class wins


class ChannelModel(nn.Module):
    """A stand-in OVSS model whose probability of class k is the input's channel k / 255 (k < 3)."""

    image_size = 32

    def encode_classes(self, names) -> Tensor:
        return torch.zeros(len(names), 1, 1)

    def predict(self, images: Tensor, text: Tensor) -> Tensor:
        assert images.shape[-2:] == (self.image_size, self.image_size)
        return images[:, : text.shape[0]] / 255


@pytest.mark.parametrize("inference", ["auto", "whole"])
def test_label_map_keeps_the_pictures_orientation(inference):
    """Six blocks (2 rows x 3 columns) of pure red, green, blue on a 60x150 picture: away from the block edges
    (which bilinear resizing blurs), the label map names the block's channel; a swap of H and W or a flip fails."""
    block_class = np.array([[0, 1, 2], [2, 0, 1]])
    height, width = 60, 150
    rows = np.repeat(np.arange(2), height // 2)[:, None]
    cols = np.repeat(np.arange(3), width // 3)[None, :]
    truth = block_class[rows, cols]
    image = (np.eye(3, dtype=np.uint8)[truth] * 255).astype(np.uint8)

    prediction = OVSSPredictor(ChannelModel(), "cpu", inference=inference).predict(image, ["r", "g", "b"])
    assert prediction.inference == ("sliding" if inference == "auto" else "whole")
    margin = 8
    inner = np.zeros_like(truth, dtype=bool)
    for r in range(2):
        for c in range(3):
            inner[r * 30 + margin : (r + 1) * 30 - margin, c * 50 + margin : (c + 1) * 50 - margin] = True
    np.testing.assert_array_equal(prediction.label_map[inner], truth[inner])


def _hand_prediction(none_below_pixels: bool = True) -> tuple[np.ndarray, OVSSPrediction]:
    """A uniform grey 30x80 picture and a hand-made prediction: four classes in vertical bands, a corner of "none"."""
    label_map = np.repeat(np.arange(4), 20)[None, :].repeat(30, axis=0).astype(np.int64)
    if none_below_pixels:
        label_map[:5, :7] = 255
    names = ("red circle", "blue square", "tv, television", "background")
    return np.full((30, 80, 3), 100, np.uint8), OVSSPrediction(names, np.zeros((4, 30, 80), np.float32), label_map, "whole")


def test_written_label_map_masks_and_summary_agree(tmp_path):
    image, prediction = _hand_prediction()
    summary = write_ovss_prediction(image, prediction, tmp_path, "grey.png", "hand")
    label_map = np.asarray(Image.open(tmp_path / "label_map.png"))
    assert label_map.dtype == np.uint8
    np.testing.assert_array_equal(label_map, prediction.label_map)
    assert summary["none_value"] == 255 and summary["none_pixels"] == 35
    assert [entry["mask"] for entry in summary["classes"]] == [
        "mask_00_red-circle.png", "mask_01_blue-square.png", "mask_02_tv-television.png", "mask_03_background.png"
    ]  # fmt: skip
    covered = np.zeros(label_map.shape, int)
    for index, entry in enumerate(summary["classes"]):
        png = np.asarray(Image.open(tmp_path / entry["mask"]))
        assert set(np.unique(png)) <= {0, 255}
        np.testing.assert_array_equal(png == 255, label_map == index)
        assert entry["pixels"] == int((label_map == index).sum()) and entry["name"] == prediction.class_names[index]
        covered += png == 255
    np.testing.assert_array_equal(covered, (label_map != 255).astype(int))  # every labelled pixel in exactly one mask
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


def test_legend_swatches_have_the_overlays_colours_in_class_order(tmp_path):
    image, prediction = _hand_prediction()
    summary = write_ovss_prediction(image, prediction, tmp_path, "grey.png", "hand")
    overlay = np.asarray(Image.open(tmp_path / "overlay.png").convert("RGB")).astype(int)
    picture, legend = overlay[:30], overlay[30:]
    assert overlay.shape[1] == 80 and legend.shape[0] > LEGEND_SWATCH
    np.testing.assert_array_equal(picture[:5, :7], 100)  # "none" pixels are not tinted
    centres = []
    for index, entry in enumerate(summary["classes"]):
        band = picture[8:, index * 20 : (index + 1) * 20].reshape(-1, 3)
        assert (band == band[0]).all()  # one colour over the class
        colour = np.rint((band[0] - 0.5 * 100) / 0.5)  # un-blend: overlay = 0.5 * grey + 0.5 * colour
        assert np.abs(colour - np.asarray(entry["colour"])).max() <= 2
        swatch = (np.abs(legend - np.asarray(entry["colour"])).max(axis=-1) == 0).nonzero()
        assert len(swatch[0]) == LEGEND_SWATCH * LEGEND_SWATCH  # exactly one solid square of that colour
        assert np.ptp(swatch[0]) == np.ptp(swatch[1]) == LEGEND_SWATCH - 1
        centres.append((swatch[0].min(), swatch[1].min()))
    assert centres == sorted(centres)  # listed row by row, left to right, in class order
    assert len({tuple(entry["colour"]) for entry in summary["classes"]}) == 4


def test_more_than_255_classes_give_a_16_bit_label_map(tmp_path):
    names = tuple(f"class {i}" for i in range(300))
    label_map = np.array([[0, 299, 65535]], np.int64)
    prediction = OVSSPrediction(names, np.zeros((300, 1, 3), np.float32), label_map, "whole")
    summary = write_ovss_prediction(np.zeros((1, 3, 3), np.uint8), prediction, tmp_path, "x.png", "hand")
    assert summary["none_value"] == 65535
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "label_map.png")).astype(np.int64), label_map)


def test_none_below_marks_pixels_no_class_is_confident_about():
    image = np.zeros((20, 20, 3), np.uint8)
    image[:, :10, 0] = 200  # left half: class 0 at 200/255; right half: every class at 0
    prediction = OVSSPredictor(ChannelModel(), "cpu", inference="whole", none_below=0.5).predict(image, ["r", "g"])
    assert (prediction.label_map[:, :7] == 0).all() and (prediction.label_map[:, 13:] == 255).all()
    assert not prediction.mask(0)[:, 13:].any() and not prediction.mask(1).any()


def test_a_new_export_replaces_the_previous_one_and_nothing_else(tmp_path):
    image, prediction = _hand_prediction()
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "mask_07_x.png").write_bytes(b"a user's file named like ours that no summary of ours names")
    write_ovss_prediction(image, prediction, tmp_path, "grey.png", "hand")
    two = OVSSPrediction(prediction.class_names[:2], prediction.probabilities[:2], np.zeros((30, 80), np.int64), "whole")
    write_ovss_prediction(image, two, tmp_path, "grey.png", "hand")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "label_map.png", "mask_00_red-circle.png", "mask_01_blue-square.png", "mask_07_x.png", "notes.txt", "overlay.png", "summary.json"
    ]  # fmt: skip


def test_outputs_and_classes_are_checked_before_the_model_loads(tiny, tmp_path, monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(ovss_predict, "load_ovss_model", must_not_load)
    a_file = tmp_path / "taken"
    a_file.write_text("")
    checkpoint, image = tiny["folder"] / "checkpoint", tiny["folder"] / "scene.png"
    with pytest.raises(ConfigError, match=f"out_dir={a_file}: is a file; give a folder"):
        predict_to_folder(checkpoint, image, CLASSES, a_file)
    with pytest.raises(ConfigError, match=f"out_dir={a_file / 'sub'}: {a_file} is a file"):
        predict_to_folder(checkpoint, image, CLASSES, a_file / "sub")
    with pytest.raises(ConfigError, match="ovss.overlap: must lie in"):
        predict_to_folder(checkpoint, image, CLASSES, tmp_path / "out", overlap=1.0)
    assert not (tmp_path / "out").exists()


def test_predict_script_with_an_ovss_checkpoint(tiny, tmp_path):
    """scripts/predict.py as a user runs it: the files of the in-process predictor on the loaded checkpoint."""
    out_dir = tmp_path / "preds"
    checkpoint, image = tiny["folder"] / "checkpoint", tiny["folder"] / "scene.png"
    result = run_script(
        "predict.py", f"checkpoint={checkpoint}", f"image={image}", "classes=[red circle, blue square, background]",
        f"out_dir={out_dir}", "device=cpu", "ovss.precision=fp32",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "(sliding inference)" in result.stdout
    loaded = load_ovss_model(checkpoint)
    expected = OVSSPredictor(loaded.model, "cpu").predict(image, CLASSES)
    np.testing.assert_array_equal(np.asarray(Image.open(out_dir / "label_map.png")), expected.label_map)
    summary = json.loads((out_dir / "summary.json").read_text())
    assert [entry["name"] for entry in summary["classes"]] == CLASSES
    assert summary["kind"] == "ovss" and summary["checkpoint"] == str(checkpoint) and summary["inference"] == "sliding"
    for entry in summary["classes"]:
        assert f"[{entry['index']:02d}] {entry['name']!r}: {entry['pixels']} px" in result.stdout


def test_demo_segments_a_shapeworld_ovss_scene_with_an_unseen_and_an_absent_class(tiny, tmp_path):
    """scripts/demo.py's step 4 on the tiny checkpoint (its vocabulary has "background"); skipped without a model."""
    spec = importlib.util.spec_from_file_location("demo_script", REPO / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert demo.ovss_example(tmp_path / "none", tmp_path / "no_model") is None and not (tmp_path / "none").exists()

    summary = demo.ovss_example(tmp_path / "ovss", tiny["folder"] / "checkpoint", "cpu")
    names = [entry["name"] for entry in summary["classes"]]
    scene = np.asarray(Image.open(tmp_path / "ovss" / "scene.png"))
    assert scene.shape == (256, 256, 3) and summary["image"] == str(tmp_path / "ovss" / "scene.png")
    assert names[-1] == "background" and len(names) >= 5  # >= 3 present, one absent, background
    assert set(names[:-2]) & set(UNSEEN_CLASSES) and names[-2] in UNSEEN_CLASSES
    label_map = np.asarray(Image.open(tmp_path / "ovss" / "label_map.png"))
    assert label_map.shape == (256, 256) and label_map.max() < len(names)


def test_predict_script_changes_the_stored_model_config_as_documented(tiny, tmp_path):
    """docs/ovss_models.md's `ovss.model='{points: grid}'` (the dense-grid ablation) must reach the model: the
    default was a struct-locked {} that Hydra refused to override; a value that is no mapping is named."""
    checkpoint, image = tiny["folder"] / "checkpoint", tiny["folder"] / "scene.png"
    common = (f"checkpoint={checkpoint}", f"image={image}", "classes=[red circle, blue square, background]", "device=cpu",
              "ovss.precision=fp32", "ovss.inference=whole")
    result = run_script("predict.py", *common, f"out_dir={tmp_path / 'grid'}", "ovss.model={points: grid}")
    assert result.returncode == 0, result.stderr
    grid = load_ovss_model(checkpoint, overrides={"points": "grid"})
    assert grid.model.config.points == "grid"
    expected = OVSSPredictor(grid.model, "cpu", inference="whole").predict(image, CLASSES)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "grid" / "label_map.png")), expected.label_map)
    refused = run_script("predict.py", *common, f"out_dir={tmp_path / 'bad'}", "ovss.model=grid")
    assert refused.returncode == 2 and "ovss.model: expected changes to the model config" in refused.stderr
