"""Overlays: captions that wrap instead of running off the picture, and contact sheets of several overlays."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from ssp_sam.visualize import BOX_COLOUR, CAPTION_LINE, MASK_COLOUR, contact_sheet, overlay, wrap_caption


def _width(text: str) -> float:
    return ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text)


def test_a_long_caption_wraps_at_spaces_within_the_width():
    caption = "the small red circle to the left of the large blue hexagon -> 412 px (right)"
    lines = wrap_caption(caption, 120)
    assert len(lines) > 1
    assert " ".join(lines) == caption  # every word kept, in order, one space apart
    assert all(_width(line) <= 120 for line in lines)
    assert wrap_caption("short", 120) == ["short"]
    assert wrap_caption("a" * 60 + " b", 120) == ["a" * 60, "b"]  # a word wider than the line keeps a line of its own


def test_overlay_band_grows_with_the_caption_and_leaves_the_picture_alone():
    image = np.full((64, 96, 3), 40, np.uint8)
    mask = np.zeros((64, 96), bool)
    mask[10:20, 30:50] = True
    one_line = np.asarray(overlay(image, mask, None, "a"))
    long = "word " * 30
    several = np.asarray(overlay(image, mask, None, long))
    lines = len(wrap_caption(long, 96 - 8))
    assert one_line.shape == (64 + CAPTION_LINE + 4, 96, 3)
    assert several.shape == (64 + CAPTION_LINE * lines + 4, 96, 3) and lines >= 3
    picture = several[:64]
    tinted = np.any(picture != 40, axis=-1)
    assert np.array_equal(tinted, mask)  # the caption never spills into the picture
    expected = np.round(0.5 * 40 + 0.5 * np.asarray(MASK_COLOUR)).astype(np.uint8)
    assert np.abs(picture[15, 40].astype(int) - expected).max() <= 1


def test_contact_sheet_places_pictures_left_to_right_top_aligned():
    red = Image.new("RGB", (10, 20), (255, 0, 0))
    green = Image.new("RGB", (7, 30), (0, 255, 0))
    sheet = np.asarray(contact_sheet([red, green], gap=3))
    assert sheet.shape == (30, 10 + 3 + 7, 3)
    assert (sheet[:20, :10] == (255, 0, 0)).all() and (sheet[20:, :10] == 0).all()  # the shorter one: black below
    assert (sheet[:, 10:13] == 0).all()  # the gap
    assert (sheet[:, 13:] == (0, 255, 0)).all()


def test_a_no_target_answer_gets_no_box():
    """The REC head's box of a no-target answer (here [0, 0, 0, 0]) is not drawn: the picture stays as it was."""
    image = np.full((32, 48, 3), 40, np.uint8)
    empty = np.zeros((32, 48), bool)
    for box in (np.zeros(4, np.float32), np.array([5, 6, 30, 20], np.float32)):
        picture = np.asarray(overlay(image, empty, box, no_target=True))
        assert np.array_equal(picture, image)
    drawn = np.asarray(overlay(image, empty, np.array([5, 6, 30, 20], np.float32)))  # a target's box is outlined
    assert (drawn[6, 5:31] == BOX_COLOUR).all() and (drawn[10, 10] == 40).all()
