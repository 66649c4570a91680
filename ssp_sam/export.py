"""Writing predictions for people and programs: mask PNGs, overlays, a summary and JSON Lines.

The JSON Lines file follows the simple format of ``formats.md`` (image, expression, rle, boxes;
an empty target means no target), so exported predictions can be read back as a dataset.

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

from .fileio import atomic_path, write_json
from .predictor import Prediction
from .visualize import overlay


def encode_rle(mask: np.ndarray) -> dict:
    """COCO RLE of an (H, W) bool mask, with the counts as a str (JSON-friendly)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def save_png(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


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
        image_name: how the image is named in the summary (usually its path).
        checkpoint: how the model is named in the summary.
    Returns:
        the summary that was written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_previous_export(out_dir)
    summary = {"image": image_name, "checkpoint": checkpoint, "predictions": []}
    lines = []
    for index, prediction in enumerate(predictions):
        mask_file, overlay_file = f"{index:02d}_mask.png", f"{index:02d}_overlay.png"
        save_png(Image.fromarray(prediction.mask.astype(np.uint8) * 255), out_dir / mask_file)
        caption = prediction.expression + ("  [no target]" if prediction.no_target else "")
        save_png(overlay(image, prediction.mask, prediction.box, caption), out_dir / overlay_file)
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
        target = {} if prediction.no_target else {"rle": rle, "boxes": [[x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)]]}
        lines.append(json.dumps({"image": image_name, "expression": prediction.expression, **target}))
    with atomic_path(out_dir / LINES_FILE) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines))
    write_json(out_dir / SUMMARY_FILE, summary)
    return summary
