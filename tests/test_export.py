"""ssp_sam/export.py: an export's predictions.jsonl read back as a dataset gives the image and the masks predicted."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ssp_sam.data.jsonl import read_jsonl_file
from ssp_sam.errors import ImageError
from ssp_sam.export import write_predictions
from ssp_sam.image_io import load_image
from ssp_sam.predictor import Prediction
from ssp_sam.visualize import BOX_COLOUR

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools, numpy 2


def _prediction(text: str, mask: np.ndarray, box, no_target: bool = False) -> Prediction:
    return Prediction(
        expression=text, mask=mask, logits=mask.astype(np.float32), box=np.asarray(box, np.float32), score=0.9,
        no_target=no_target, padded_area=int(mask.sum()), padded_logits=np.zeros((2, 2), np.float32),
    )


def _read_back(jsonl):
    dataset = read_jsonl_file(jsonl, name="export", split="test")
    return [(sample, sample.expressions[index]) for sample, index in dataset.per_sentence()]


def test_jsonl_read_back_finds_the_image_typed_relative_to_the_current_directory(tmp_path, monkeypatch):
    """The image path as typed (relative to the current directory) is written relative to the JSONL's folder,
    which is where the reader looks: the round trip finds the image and gives the masks that were exported."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs").mkdir()
    image = np.random.default_rng(0).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "imgs" / "scene.png")
    mask = np.zeros((6, 9), bool)
    mask[1:4, 2:7] = True
    predictions = [_prediction("the thing", mask, [2, 1, 7, 4]), _prediction("nothing", np.zeros((6, 9), bool), [0, 0, 0, 0], True)]
    write_predictions(image, predictions, "preds/run", "imgs/scene.png", "tiny")
    assert json.loads((tmp_path / "preds/run/summary.json").read_text())["image"] == "imgs/scene.png"  # as typed

    (found, text), (empty, text_empty) = _read_back(tmp_path / "preds/run/predictions.jsonl")
    assert found.image_path.is_file() and found.image_path.resolve() == (tmp_path / "imgs/scene.png").resolve()
    np.testing.assert_array_equal(load_image(found.image_path), image)
    assert text == "the thing" and np.array_equal(found.mask(), mask)
    assert found.boxes_xyxy == ((2.0, 1.0, 7.0, 4.0),)
    assert text_empty == "nothing" and empty.no_target and not empty.mask().any()


def test_the_overlay_of_a_no_target_answer_has_no_box(tmp_path):
    """The REC head's box of a no-target answer ([0, 0, 0, 0] here) is not drawn: the picture stays untouched."""
    image = np.full((6, 9, 3), 40, np.uint8)
    write_predictions(image, [_prediction("nothing", np.zeros((6, 9), bool), [0, 0, 0, 0], True)], tmp_path, "scene.png", "tiny")
    shown = np.asarray(Image.open(tmp_path / "00_overlay.png"))[:6]
    assert not (shown == BOX_COLOUR).all(axis=-1).any()
    np.testing.assert_array_equal(shown, image)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jsonl_masks_of_an_exif_turned_photo_lie_on_the_pixels_they_were_predicted_on(tmp_path, orientation):
    """A photo is predicted on as displayed (EXIF orientation applied) but datasets read the stored pixels:
    read back, every mask and box must cover the same picture pixels as the prediction did on the display."""
    height, width = 5, 7
    rows, cols = np.mgrid[0:height, 0:width]
    stored = np.stack([rows * 10, cols * 10, np.full_like(rows, 99)], axis=-1).astype(np.uint8)  # pixel = its place
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "photo.png", exif=exif)
    displayed = load_image(tmp_path / "photo.png", exif_orientation=True)  # as scripts/predict.py reads a photo
    shown_h, shown_w = displayed.shape[:2]
    mask = np.zeros((shown_h, shown_w), bool)
    mask[0:2, 1:4] = True  # a corner region: any wrong turn or flip moves it
    write_predictions(displayed, [_prediction("the corner", mask, [1, 0, 4, 2])], tmp_path / "out", str(tmp_path / "photo.png"), "tiny")

    [(sample, _)] = _read_back(tmp_path / "out" / "predictions.jsonl")
    as_read = load_image(sample.image_path)  # how every dataset reader loads it: stored pixels
    read_mask = sample.mask()
    assert read_mask.shape == as_read.shape[:2] == (height, width)
    expected = np.zeros((height, width), bool)
    places = displayed[mask]
    expected[places[:, 0] // 10, places[:, 1] // 10] = True  # the stored pixels the predicted ones show
    np.testing.assert_array_equal(read_mask, expected)
    ys, xs = np.nonzero(expected)
    assert sample.boxes_xyxy == ((xs.min(), ys.min(), xs.max() + 1.0, ys.max() + 1.0),)

    # The summary and PNGs stay in the frame a person sees.
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "00_mask.png")) == 255, mask)


def test_an_image_in_neither_frame_of_a_turned_photo_is_refused_before_writing(tmp_path):
    stored = np.random.default_rng(1).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 3
    Image.fromarray(stored).save(tmp_path / "photo.png", exif=exif)
    other = np.zeros_like(stored)
    with pytest.raises(ImageError, match="photo.png: the image given is neither"):
        write_predictions(other, [_prediction("x", np.ones((4, 6), bool), [0, 0, 6, 4])], tmp_path / "out", str(tmp_path / "photo.png"), "tiny")
    assert not (tmp_path / "out").exists()
    # The stored pixels themselves are taken as they are: no turn.
    write_predictions(stored, [_prediction("x", np.eye(4, 6, dtype=bool), [0, 0, 4, 4])], tmp_path / "out", str(tmp_path / "photo.png"), "tiny")
    [(sample, _)] = _read_back(tmp_path / "out" / "predictions.jsonl")
    np.testing.assert_array_equal(sample.mask(), np.eye(4, 6, dtype=bool))
