"""Overlays that let a person check a prediction at a glance."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor

from .backbones.sam_frames import SAMImageTransform, padded_frame_to_original
from .letterbox import Letterbox

MASK_COLOUR = (255, 64, 160)
BOX_COLOUR = (64, 255, 255)
CAPTION_LINE = 14  # height of a caption line, in pixels (PIL's default font)


def overlay(
    image: np.ndarray,
    mask: np.ndarray,
    box_xyxy: np.ndarray | None = None,
    caption: str | None = None,
    alpha: float = 0.5,
    no_target: bool = False,
) -> Image.Image:
    """Blend ``mask`` (H, W bool) over ``image`` (H, W, 3 uint8), outline the box, add a caption.

    The caption is drawn on a dark band under the picture so it never hides the mask. A no-target
    answer (``no_target=True``) gets no box: the REC head outputs a box for every sentence, and
    outlining it (often [0, 0, 0, 0], a mark in the corner) would show a target the answer denies.
    """
    base = image.astype(np.float32)
    tint = np.asarray(MASK_COLOUR, dtype=np.float32)
    blended = np.where(mask[..., None], (1 - alpha) * base + alpha * tint, base)
    canvas = Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    if box_xyxy is not None and not no_target and np.all(np.isfinite(box_xyxy)):
        x0, y0, x1, y1 = (float(v) for v in box_xyxy)
        draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], outline=BOX_COLOUR, width=2)
    if caption:
        lines = wrap_caption(caption, canvas.width - 8)
        framed = Image.new("RGB", (canvas.width, canvas.height + CAPTION_LINE * len(lines) + 4), (0, 0, 0))
        framed.paste(canvas, (0, 0))
        for row, line in enumerate(lines):
            ImageDraw.Draw(framed).text((4, canvas.height + 3 + CAPTION_LINE * row), line, fill=(255, 255, 255))
        canvas = framed
    return canvas


def text_width(text: str) -> float:
    """Width of ``text`` in pixels, drawn in PIL's default font (as captions and legends are)."""
    return ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text)


def wrap_caption(caption: str, width: int) -> list[str]:
    """``caption`` broken at spaces into lines no wider than ``width`` pixels in PIL's default font
    (a single word wider than that keeps a line to itself)."""
    lines: list[str] = []
    for word in caption.split():
        if lines and text_width(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def contact_sheet(pictures: Sequence[Image.Image], gap: int = 4) -> Image.Image:
    """The pictures side by side, top-aligned, ``gap`` black pixels apart, on a black ground (e.g. one
    overlay per expression of an image, to look at them together)."""
    width = sum(picture.width for picture in pictures) + gap * max(len(pictures) - 1, 0)
    sheet = Image.new("RGB", (max(width, 1), max((picture.height for picture in pictures), default=1)), (0, 0, 0))
    left = 0
    for picture in pictures:
        sheet.paste(picture.convert("RGB"), (left, 0))
        left += picture.width + gap
    return sheet


def padded_prediction_overlay(
    image: np.ndarray,
    padded_logits: Tensor,
    box_cxcywh: Tensor,
    letterbox: Letterbox,
    sam_image_size: int,
    mask_target: str,
    caption: str | None = None,
) -> Image.Image:
    """:func:`overlay` of a raw model output: mask logits in SAM's padded frame, the box in CLIP's square.

    Args:
        image: (H, W, 3) uint8, the picture the model saw.
        padded_logits: (S/2, S/2) mask logits in SAM's padded frame (S = ``sam_image_size``).
        box_cxcywh: (4,) the REC box, normalised to CLIP's square, where ``letterbox`` placed the image.
        mask_target: the model's ``mask_target``, which says where its frame pixels lie in the image.
    """
    input_size = SAMImageTransform(sam_image_size).input_size_for(image.shape[:2])
    logits = padded_frame_to_original(padded_logits[None, None].float(), input_size, image.shape[:2], sam_image_size, mask_target)
    return overlay(image, (logits[0, 0] > 0).numpy(), letterbox.box_to_image(box_cxcywh.float()).numpy(), caption)


LEGEND_SWATCH = 10  # side of a legend's colour square, in pixels
LEGEND_ROW = 14  # height of a legend row
LEGEND_MARGIN = 4


def class_colours(count: int) -> np.ndarray:
    """(count, 3) uint8: one colour per class, the same for a class at the same index in every picture.

    Hues step by the golden ratio (each new hue falls into the widest gap the earlier ones left, so
    neighbours in a class list differ most) and brightness cycles through three levels, so that two
    classes whose hues come close still look different.
    """
    colours = []
    for index in range(count):
        hue = (index * 0.618033988749895) % 1.0
        saturation, value = ((0.75, 1.0), (0.95, 0.75), (0.55, 0.9))[index % 3]
        colours.append([round(255 * channel) for channel in colorsys.hsv_to_rgb(hue, saturation, value)])
    return np.asarray(colours, dtype=np.uint8).reshape(count, 3)


def label_overlay(
    image: np.ndarray,
    label_map: np.ndarray,
    class_names: Sequence[str],
    colours: np.ndarray,
    alpha: float = 0.5,
) -> Image.Image:
    """Blend each class's colour over its pixels and add a legend naming every class under the picture.

    Args:
        image: (H, W, 3) uint8.
        label_map: (H, W) integers; value k < len(class_names) is class k, any other value (the
            "none" value of a prediction) is left untinted.
        colours: (len(class_names), 3) uint8, e.g. :func:`class_colours`.

    Returns:
        the picture (H, W) over a legend band: per class, in list order (row by row, left to right), a
        ``LEGEND_SWATCH`` square of exactly its colour, its name and its share of the picture's pixels.
    """
    count = len(class_names)
    labelled = (label_map >= 0) & (label_map < count)
    tint = colours.astype(np.float32)[np.where(labelled, label_map, 0)]
    base = image.astype(np.float32)
    blended = np.where(labelled[..., None], (1 - alpha) * base + alpha * tint, base)
    picture = Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8))
    shares = np.bincount(label_map[labelled].ravel(), minlength=count) / max(label_map.size, 1)
    entries = [f"{name} {100 * share:.1f}%" for name, share in zip(class_names, shares)]
    legend = _legend(entries, colours, picture.width)
    framed = Image.new("RGB", (picture.width, picture.height + legend.height), (0, 0, 0))
    framed.paste(picture, (0, 0))
    framed.paste(legend, (0, picture.height))
    return framed


def _legend(entries: Sequence[str], colours: np.ndarray, width: int) -> Image.Image:
    """A black band ``width`` wide: entries in equal columns (as many as fit, at least one), row by row."""
    column = LEGEND_SWATCH + 4 + max((int(text_width(text)) for text in entries), default=0) + 2 * LEGEND_MARGIN
    columns = max(1, (width - LEGEND_MARGIN) // column)
    rows = -(-len(entries) // columns)
    band = Image.new("RGB", (width, rows * LEGEND_ROW + LEGEND_MARGIN), (0, 0, 0))
    draw = ImageDraw.Draw(band)
    for index, (text, colour) in enumerate(zip(entries, colours)):
        x = LEGEND_MARGIN + (index % columns) * column
        y = LEGEND_MARGIN + (index // columns) * LEGEND_ROW
        draw.rectangle([x, y, x + LEGEND_SWATCH - 1, y + LEGEND_SWATCH - 1], fill=tuple(int(c) for c in colour))
        draw.text((x + LEGEND_SWATCH + 4, y - 1), text, fill=(255, 255, 255))
    return band
