"""Reading images from paths, PIL images or arrays into one canonical form: RGB uint8 (H, W, 3).

Grayscale is replicated to three channels, RGBA is composited onto black (the alpha channel is
dropped after premultiplying, which is what a viewer shows on a dark page), and 16-bit data is
scaled to 8 bits by its full range (x / 257), so the same picture saved at either depth gives
the same array.

User photos can be rotated by an EXIF orientation tag (phones store the sensor's pixels and a tag
saying how to turn them); ``exif_orientation=True`` turns them as a viewer shows them. Dataset
images are read as stored, since their annotations are in the stored pixels' frame. Images larger
than PIL's decompression-bomb limit (about 179 million pixels) are refused with an ImageError.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]


def _to_uint8(array: np.ndarray, name: str) -> np.ndarray:
    """Convert an integer or float array to uint8 without clipping surprises."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        # 16-bit data spans 0..65535 whatever the picture's brightness; x / 257 maps it onto 0..255.
        return np.round(array.astype(np.float64) / 257.0).astype(np.uint8)
    if array.dtype in (np.int32, np.int64, np.int16, np.uint32):
        if array.min(initial=0) < 0:
            raise ImageError(f"{name}: integer image with negative values cannot be converted")
        # Depth unknown: values above 255 can only be 16-bit data.
        if array.max(initial=0) > 255:
            return np.clip(np.round(array.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageError(f"{name}: float image contains NaN or Inf")
        scale = 255.0 if array.max(initial=0.0) <= 1.0 else 1.0
        return np.clip(np.round(array * scale), 0, 255).astype(np.uint8)
    raise ImageError(f"{name}: unsupported image dtype {array.dtype}")


def _to_rgb(array: np.ndarray, name: str) -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 -> (H, W, 3) uint8."""
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ImageError(f"{name}: expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image, got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"{name}: image has zero size {array.shape[:2]}")
    if array.shape[2] == 1:
        return np.repeat(array, 3, axis=2)
    if array.shape[2] == 4:
        alpha = array[:, :, 3:4].astype(np.float32) / 255.0
        return np.round(array[:, :, :3].astype(np.float32) * alpha).astype(np.uint8)
    # Writable too: np.asarray of a PIL image is read-only, which torch.from_numpy warns about.
    return np.require(array, requirements=("C_CONTIGUOUS", "WRITEABLE"))


def _pil_to_array(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L"):
        return np.asarray(image).astype(np.uint16)
    if image.mode == "I":
        return np.asarray(image).astype(np.int64)
    if image.mode == "F":
        return np.asarray(image, dtype=np.float32)
    if image.mode in ("RGB", "RGBA", "L"):
        return np.asarray(image)
    if image.mode == "LA":
        return np.asarray(image.convert("RGBA"))
    if image.mode in ("P", "PA") and "transparency" in image.info:
        return np.asarray(image.convert("RGBA"))
    return np.asarray(image.convert("RGB"))


def load_image(source: ImageLike, name: str | None = None, exif_orientation: bool = False) -> np.ndarray:
    """Return ``source`` as an RGB uint8 array of shape (H, W, 3).

    Args:
        source: a file path, a PIL image or a numpy array (uint8, uint16, bool or float in [0, 1]).
        name: how to call the image in error messages (defaults to the path or the type).
        exif_orientation: turn a file or PIL image as its EXIF orientation tag says (user photos);
            False keeps the stored pixels (dataset images, whose annotations use them).

    Raises:
        ImageError: the file is missing (or a directory), empty, not an image, corrupt, too large to
            decode safely, or the array has a bad shape.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        label = name or str(path)
        if path.is_dir():  # "not found" would send the user looking for a file that is there, as a folder
            raise ImageError(f"{label}: is a directory, not an image file")
        if not path.is_file():
            raise ImageError(f"{label}: image file not found")
        if path.stat().st_size == 0:
            raise ImageError(f"{label}: image file is empty (0 bytes)")
        try:
            with Image.open(path) as image:
                image.load()
                array = _pil_to_array(ImageOps.exif_transpose(image) if exif_orientation else image)
        except Image.DecompressionBombError as exc:
            raise ImageError(f"{label}: too large to decode safely ({exc})") from None
        except UnidentifiedImageError as exc:
            raise ImageError(f"{label}: not a readable image file") from exc
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageError(f"{label}: corrupt or truncated image ({exc})") from exc
    elif isinstance(source, Image.Image):
        label = name or "PIL image"
        array = _pil_to_array(ImageOps.exif_transpose(source) if exif_orientation else source)
    elif isinstance(source, np.ndarray):
        label = name or "array image"
        array = source
    else:
        raise ImageError(f"{name or 'image'}: expected a path, a PIL image or a numpy array, got {type(source).__name__}")
    return _to_rgb(_to_uint8(np.asarray(array), label), label)
