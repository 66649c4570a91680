"""Writing predictions for people and programs: mask PNGs, overlays, a summary and JSON Lines.

The JSON Lines file follows the simple format of :mod:`ssp_sam.data.jsonl` (image, expression, rle,
boxes; an empty target means no target), so exported predictions can be read back as a dataset:

- its image path is written relative to the JSON Lines file's folder (absolute when no relative
  path exists), as the reader resolves it, not as typed (relative to the current directory);
- its masks and boxes are in the image file's stored pixel frame, as every dataset's annotations
  are (datasets read images as stored). A photo with an EXIF orientation tag is predicted on as
  displayed (``load_image(..., exif_orientation=True)``, ``Predictor.predict(path)``): its JSON
  Lines masks and boxes are turned back into the stored frame, so read back they lie on the pixels
  they were predicted on. The mask PNGs, overlays and ``summary.json`` stay in the frame of the
  image given (as displayed), where a person looks at them.

Writing into a folder that holds an earlier export first removes that export (the files its
``summary.json`` names, then the summary and the JSON Lines), so no stale mask sits beside the new
summary; files the export did not write are never touched.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from .errors import ImageError
from .fileio import atomic_path, write_json
from .image_io import load_image
from .predictor import Prediction
from .visualize import overlay

EXIF_ORIENTATION = 0x0112
# Per EXIF orientation tag (2-8): the transpose that takes the displayed picture back to the stored
# pixels, the inverse of the one ImageOps.exif_transpose applies (6 and 8 are each other's inverse).
_TO_STORED = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def encode_rle(mask: np.ndarray) -> dict:
    """COCO RLE of an (H, W) bool mask, with the counts as a str (JSON-friendly)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def save_png(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def _orientation(path: Path) -> int:
    """The EXIF orientation tag (2-8) of the image file at ``path``; 1 when it has none, another
    value, or the file is no readable image (nothing to turn: PIL's exif_transpose ignores it too)."""
    try:
        with Image.open(path) as image:
            tag = image.getexif().get(EXIF_ORIENTATION, 1)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return 1
    return tag if isinstance(tag, int) and tag in _TO_STORED else 1


def _displayed_orientation(image: np.ndarray, image_file: Path, image_name: str) -> int:
    """The orientation tag to undo to bring ``image``'s frame to ``image_file``'s stored pixels: the
    file's tag when ``image`` is the file as displayed, 1 when it is the stored pixels (or the file
    has no tag). Which of the two it is is found from the pixels, as nothing else tells.

    Raises:
        ImageError: the file has a tag and ``image`` is neither frame of it, so the JSON Lines could
            not say where its masks lie.
    """
    tag = _orientation(image_file)
    if tag == 1:
        return 1
    if np.array_equal(image, load_image(image_file, name=image_name, exif_orientation=True)):
        return tag
    if np.array_equal(image, load_image(image_file, name=image_name)):
        return 1
    raise ImageError(
        f"{image_name}: the image given is neither the file's stored pixels nor them turned by its EXIF orientation "
        f"({tag}), so the exported masks cannot be placed on the file's pixels"
    )


def _stored_box(box: np.ndarray, tag: int, width: int, height: int) -> list[float]:
    """``box`` (xyxy) on the displayed picture (``width`` x ``height``) as xyxy on the stored pixels
    of a file with EXIF orientation ``tag`` (1: unchanged)."""
    if tag == 1:
        return [float(v) for v in box]
    to_stored = {  # displayed (u, v) -> stored (x, y), the coordinate map of _TO_STORED[tag]
        2: lambda u, v: (width - u, v),
        3: lambda u, v: (width - u, height - v),
        4: lambda u, v: (u, height - v),
        5: lambda u, v: (v, u),
        6: lambda u, v: (v, width - u),
        7: lambda u, v: (height - v, width - u),
        8: lambda u, v: (height - v, u),
    }[tag]
    (xa, ya), (xb, yb) = to_stored(float(box[0]), float(box[1])), to_stored(float(box[2]), float(box[3]))
    return [min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb)]


def _jsonl_image_path(image_file: Path, out_dir: Path) -> str:
    """``image_file`` (as typed: relative to the current directory) as the JSON Lines reader resolves
    it, relative to the file's folder ``out_dir``; absolute where no relative path exists (another
    drive). Both are resolved first, so a symlinked ``out_dir`` does not misdirect a ``..``."""
    target, folder = image_file.resolve(), out_dir.resolve()
    try:
        return Path(os.path.relpath(target, folder)).as_posix()
    except ValueError:
        return str(target)


SUMMARY_FILE, LINES_FILE = "summary.json", "predictions.jsonl"
_OUR_IMAGE = re.compile(r"\d{2,}_(mask|overlay)\.png")  # the names write_predictions gives its PNGs


def _remove_previous_export(out_dir: Path) -> None:
    """Delete the export an earlier run left in ``out_dir``: its summary, JSON Lines and the PNGs it names.

    The summary goes first, so it never names a missing file. Only names of the form
    write_predictions gives are deleted: a foreign or hand-edited summary removes nothing else.
    """
    summary_path = out_dir / SUMMARY_FILE
    try:
        previous = json.loads(summary_path.read_text())
        named = [entry[kind] for entry in previous["predictions"] for kind in ("mask", "overlay")]
    except (OSError, ValueError, KeyError, TypeError):
        return  # no earlier export of ours
    summary_path.unlink()
    (out_dir / LINES_FILE).unlink(missing_ok=True)
    for name in named:
        if isinstance(name, str) and _OUR_IMAGE.fullmatch(name):
            (out_dir / name).unlink(missing_ok=True)


def _line_target(prediction: Prediction, rle: dict, tag: int, width: int, height: int) -> dict:
    """The JSON Lines target of a prediction on a picture ``width`` x ``height``: its RLE and box (xywh),
    turned into the stored frame of a file with EXIF orientation ``tag`` (``rle`` is the mask's, as is)."""
    if tag != 1:
        stored = Image.fromarray(prediction.mask.astype(np.uint8)).transpose(_TO_STORED[tag])
        rle = encode_rle(np.asarray(stored).astype(bool))
    x0, y0, x1, y1 = (round(v, 2) for v in _stored_box(prediction.box, tag, width, height))
    return {"rle": rle, "boxes": [[x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)]]}


def write_predictions(
    image: np.ndarray,
    predictions: Sequence[Prediction],
    out_dir: str | os.PathLike,
    image_name: str,
    checkpoint: str,
) -> dict:
    """Write ``NN_mask.png`` (0/255), ``NN_overlay.png``, ``summary.json`` and ``predictions.jsonl``.

    An earlier export in ``out_dir`` is removed first; the summary is written last, so a folder
    with a summary always holds exactly the files it names.

    Args:
        image: (H, W, 3) uint8, the image the predictions are for.
        image_name: how the image is named in the summary (usually its path, as typed). When it names
            an image file, ``predictions.jsonl`` names that file relative to ``out_dir`` and gives
            masks and boxes in its stored pixel frame (see the module's docstring); otherwise it
            names the image as given (and cannot be read back as a dataset).
        checkpoint: how the model is named in the summary.
    Returns:
        the summary that was written.
    Raises:
        ImageError: ``image_name`` is a file with an EXIF orientation tag and ``image`` is neither
            its stored nor its displayed pixels (raised before anything is written).
    """
    out_dir = Path(out_dir)
    image_file = Path(image_name)
    if image_file.is_file():
        line_image, tag = _jsonl_image_path(image_file, out_dir), _displayed_orientation(image, image_file, image_name)
    else:
        line_image, tag = image_name, 1
    height, width = image.shape[:2]
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_previous_export(out_dir)
    summary = {"image": image_name, "checkpoint": checkpoint, "predictions": []}
    lines = []
    for index, prediction in enumerate(predictions):
        mask_file, overlay_file = f"{index:02d}_mask.png", f"{index:02d}_overlay.png"
        save_png(Image.fromarray(prediction.mask.astype(np.uint8) * 255), out_dir / mask_file)
        caption = prediction.expression + ("  [no target]" if prediction.no_target else "")
        save_png(overlay(image, prediction.mask, prediction.box, caption, no_target=prediction.no_target), out_dir / overlay_file)
        rle = encode_rle(prediction.mask)
        x0, y0, x1, y1 = (round(float(v), 2) for v in prediction.box)
        summary["predictions"].append(
            {
                "expression": prediction.expression,
                "mask": mask_file,
                "overlay": overlay_file,
                "rle": rle,
                "box_xyxy": [x0, y0, x1, y1],
                "score": round(prediction.score, 4),
                "no_target": prediction.no_target,
                "area": int(prediction.mask.sum()),
            }
        )
        target = {} if prediction.no_target else _line_target(prediction, rle, tag, width, height)
        lines.append(json.dumps({"image": line_image, "expression": prediction.expression, **target}))
    with atomic_path(out_dir / LINES_FILE) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines))
    write_json(out_dir / SUMMARY_FILE, summary)
    return summary
