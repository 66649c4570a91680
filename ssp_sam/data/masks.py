"""Ground-truth masks of a referent, kept in their file form and decoded only when asked for.

Loading RefCOCO's train split must not rasterise 40 000 masks up front, so a sample holds a small
"target" object that knows how to draw its referent on an (H, W) canvas. Two kinds live here:

- :class:`CocoSegmentationMask`: the union of COCO-style segmentations (polygons, uncompressed RLE
  as used by crowd annotations, compressed RLE, a list of RLEs as in refclef), rasterised by pycocotools
  (``frPyObjects`` + ``merge`` + ``decode``) as the COCO API does. REFER's ``getMask`` sums the decoded
  parts instead; the SSP-SAM release and ReLA keep every pixel > 0 of that sum (the union, as here),
  LAVT only pixels equal to 1, so pixels where two polygons of one annotation overlap are background
  in LAVT's ground truth (rare: most annotations' polygons do not overlap).
- :class:`PngMask`: a binary mask image on disk (any non-zero pixel is foreground).

Both return ``np.ndarray`` of dtype bool and shape (H, W) from ``decode(height, width)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image, UnidentifiedImageError

from ..errors import DatasetError, ImageError

# pycocotools reads a 4-number "polygon" as a box [x, y, w, h]; a polygon needs 3 points anyway.
_MIN_POLYGON_COORDS = 6


@lru_cache(maxsize=None)
def read_image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image file read from its header only (PIL opens lazily), cached per path.

    Raises:
        ImageError: the file is missing or not an image.
    """
    try:
        with Image.open(path) as image:
            width, height = image.size
    except FileNotFoundError as exc:
        raise ImageError(f"{path}: image file not found") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageError(f"{path}: not a readable image file ({exc})") from exc
    return height, width


def _check_rle_size(rle: dict, height: int, width: int, label: str) -> None:
    size = rle.get("size")
    if not isinstance(size, (list, tuple)) or len(size) != 2:
        raise DatasetError(f"{label}: RLE without a valid 'size' [height, width]")
    if (int(size[0]), int(size[1])) != (height, width):
        raise DatasetError(f"{label}: RLE size {list(size)} differs from the image size [{height}, {width}]")


def _polygons_to_rles(polygons: list, height: int, width: int, label: str) -> list[dict]:
    kept = []
    for polygon in polygons:
        if not isinstance(polygon, (list, tuple)):
            raise DatasetError(f"{label}: a polygon must be a flat list [x1, y1, x2, y2, ...], got {type(polygon).__name__}")
        try:
            coords = np.asarray(polygon, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise DatasetError(f"{label}: polygon with non-numeric coordinates") from exc
        if coords.ndim != 1 or coords.size % 2 or not np.isfinite(coords).all():
            raise DatasetError(f"{label}: a polygon must be an even-length flat list of finite numbers")
        if coords.size >= _MIN_POLYGON_COORDS:
            kept.append(coords.tolist())
    if not kept:
        return []
    return mask_utils.frPyObjects(kept, height, width)


def segmentation_to_rles(segmentation: Any, height: int, width: int, label: str) -> list[dict]:
    """One COCO segmentation -> list of compressed RLEs (pycocotools form, counts as bytes).

    Args:
        segmentation: polygons (list of flat [x1, y1, ...] lists), an uncompressed RLE
            ({"size": [H, W], "counts": [int, ...]}), a compressed RLE (counts a str or bytes), or
            a list of RLE dicts (ReferIt/refclef's instances.json stores every mask that way; REFER
            decodes the list and sums it, i.e. takes the union).
        label: names the annotation in error messages (file and id).
    """
    if isinstance(segmentation, (list, tuple)):
        if segmentation and all(isinstance(part, dict) for part in segmentation):
            return [rle for part in segmentation for rle in segmentation_to_rles(part, height, width, label)]
        if any(isinstance(part, dict) for part in segmentation):
            raise DatasetError(f"{label}: a segmentation list must hold only polygons or only RLE dicts, not both")
        return _polygons_to_rles(list(segmentation), height, width, label)
    if isinstance(segmentation, dict) and "counts" in segmentation:
        _check_rle_size(segmentation, height, width, label)
        counts = segmentation["counts"]
        if isinstance(counts, (list, tuple)):
            if any(not isinstance(c, int) or c < 0 for c in counts) or sum(counts) != height * width:
                raise DatasetError(f"{label}: uncompressed RLE counts must be non-negative ints summing to H*W")
            return [mask_utils.frPyObjects({"size": [height, width], "counts": list(counts)}, height, width)]
        if isinstance(counts, str):
            counts = counts.encode("ascii")
        if isinstance(counts, bytes):
            return [{"size": [height, width], "counts": counts}]
    raise DatasetError(f"{label}: unsupported segmentation (expected polygons, or an RLE dict with 'size' and 'counts')")


@dataclass(frozen=True)
class CocoSegmentationMask:
    """Union of COCO-style segmentations; no parts means an empty (no-target) mask.

    Attributes:
        parts: (label, segmentation) pairs, one per annotation; label names the annotation (file
            and id) in error messages.
    """

    parts: tuple[tuple[str, Any], ...]

    def decode(self, height: int, width: int) -> np.ndarray:
        """Rasterise the union of all parts -> bool (height, width)."""
        rles = []
        for label, segmentation in self.parts:
            rles.extend(segmentation_to_rles(segmentation, height, width, label))
        if not rles:
            return np.zeros((height, width), dtype=bool)
        try:
            mask = mask_utils.decode(mask_utils.merge(rles))
        except Exception as exc:  # pycocotools raises bare Exceptions / ValueErrors on bad RLE strings
            labels = ", ".join(label for label, _ in self.parts)
            raise DatasetError(f"{labels}: segmentation cannot be decoded ({exc})") from exc
        if mask.shape != (height, width):
            raise DatasetError(f"{self.parts[0][0]}: decoded mask has shape {mask.shape}, expected {(height, width)}")
        return mask.astype(bool)


@dataclass(frozen=True)
class PngMask:
    """A mask stored as an image file; every non-zero pixel (in any channel) is foreground."""

    path: Path

    def decode(self, height: int, width: int) -> np.ndarray:
        """Read the file -> bool (height, width); its size must equal the image's."""
        try:
            with Image.open(self.path) as image:
                array = np.asarray(image)
        except FileNotFoundError as exc:
            raise DatasetError(f"{self.path}: mask file not found") from exc
        except (UnidentifiedImageError, OSError) as exc:
            raise DatasetError(f"{self.path}: not a readable mask image ({exc})") from exc
        mask = array.any(axis=2) if array.ndim == 3 else array != 0
        if mask.shape != (height, width):
            raise DatasetError(f"{self.path}: mask size {mask.shape} differs from the image size {(height, width)}")
        return mask
