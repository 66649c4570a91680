"""The letterbox that puts an image into CLIP's square, and the box and mask conversions between the frames.

As the release's ``RandomResize`` / ``ToTensor`` / ``NormalizeAndPad`` (torchvision 0.16 on PIL images):
long side to the CLIP size with PIL's bilinear filter on the uint8 image, CLIP's mean / std, zero
padding after normalising; centred at test time, at uniform random integer offsets in training (or
one of K fixed placements). Boxes scale by each axis's own ratio after rounding the resized size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .errors import ConfigError, ImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Letterbox:
    """Where an image went inside CLIP's size x size square.

    The ``original_width`` x ``original_height`` image was resized to ``width`` x ``height`` pixels (its
    long side to ``size``, the other rounded) and pasted with its top-left corner at (``offset_x``,
    ``offset_y``).
    """

    offset_x: int
    offset_y: int
    width: int
    height: int
    size: int
    original_width: int
    original_height: int

    @property
    def scale_x(self) -> float:
        """Horizontal resize ratio, after rounding the resized width (the release's ``ratio_w``)."""
        return self.width / self.original_width

    @property
    def scale_y(self) -> float:
        """Vertical resize ratio, after rounding the resized height (the release's ``ratio_h``)."""
        return self.height / self.original_height

    def box_to_image(self, boxes_cxcywh_norm: Tensor) -> Tensor:
        """(..., 4) cx, cy, w, h normalised to the square -> (..., 4) x1, y1, x2, y2 in original-image pixels,
        clipped to the image ([0, W] x [0, H]: a prediction may reach into the padding), as the release's
        ``PostProcess`` returns its boxes and scores them.
        """
        center_x, center_y, box_width, box_height = (boxes_cxcywh_norm * self.size).unbind(-1)
        x1 = (center_x - box_width / 2 - self.offset_x) / self.scale_x
        y1 = (center_y - box_height / 2 - self.offset_y) / self.scale_y
        x2 = (center_x + box_width / 2 - self.offset_x) / self.scale_x
        y2 = (center_y + box_height / 2 - self.offset_y) / self.scale_y
        xs = torch.stack([x1, x2], dim=-1).clamp(0, self.original_width)
        ys = torch.stack([y1, y2], dim=-1).clamp(0, self.original_height)
        return torch.stack([xs[..., 0], ys[..., 0], xs[..., 1], ys[..., 1]], dim=-1)

    def box_from_image(self, boxes_xyxy: Tensor) -> Tensor:
        """(..., 4) x1, y1, x2, y2 in original-image pixels -> (..., 4) cx, cy, w, h normalised to the square."""
        x1, y1, x2, y2 = boxes_xyxy.to(torch.float32).unbind(-1)
        x1 = x1 * self.scale_x + self.offset_x
        x2 = x2 * self.scale_x + self.offset_x
        y1 = y1 * self.scale_y + self.offset_y
        y2 = y2 * self.scale_y + self.offset_y
        return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1) / self.size


def letterbox_image(
    image: np.ndarray,
    size: int,
    placement: str | tuple[int, int] = "center",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Letterbox]:
    """Put an RGB image into CLIP's square: long side to ``size``, aspect kept, zero padding after normalising.

    Args:
        image: (H, W, 3) uint8 RGB.
        size: side of the square (the CLIP image size).
        placement: "center" (test time, floor((size - new) / 2) offsets), "random" (training: uniform
            integer offsets drawn from ``generator``) or explicit (offset_x, offset_y).
        generator: random source for "random" placement.

    Returns:
        pixels: (3, size, size) float32, CLIP-normalised; the padding is exactly 0.
        letterbox: the placement, for mapping boxes and masks between the two frames.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        description = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ImageError(f"image must be a uint8 (H, W, 3) array, got {description}")
    box = _place(image.shape[0], image.shape[1], size, placement, generator)

    if (box.height, box.width) != image.shape[:2]:  # PIL's bilinear filter (antialiased when shrinking), as the release
        image = np.asarray(Image.fromarray(image).resize((box.width, box.height), Image.Resampling.BILINEAR))
    pixels = torch.tensor(image, dtype=torch.float32).permute(2, 0, 1) / 255.0  # torchvision's to_tensor
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)

    square = torch.zeros(3, size, size)
    square[:, box.offset_y : box.offset_y + box.height, box.offset_x : box.offset_x + box.width] = (pixels - mean) / std
    return square, box


def fixed_placements(height: int, width: int, size: int, count: int) -> list[tuple[int, int]]:
    """``count`` fixed (offset_x, offset_y) placements of an height x width image in the size x size square.

    The offsets are evenly spaced over the free range, both ends included (one placement: the
    centred one). ``train.clip_placements: K`` draws among these K instead of the release's uniform
    integer offsets, so that the CLIP input of an image takes only K values and its CLIP tokens can
    be cached (:class:`ssp_sam.feature_cache.ImageTokenCache`); a deviation from the release. A square
    image has no free range: every placement is (0, 0), as the release's random one is.
    """
    if count < 1:
        raise ConfigError(f"placements: count must be >= 1, got {count}")
    if count == 1:
        centred = _place(height, width, size, "center", None)
        return [(centred.offset_x, centred.offset_y)]
    new_height, new_width = _resized_shape(height, width, size)
    free_x, free_y = size - new_width, size - new_height
    return [(round(i * free_x / (count - 1)), round(i * free_y / (count - 1))) for i in range(count)]


def letterbox_mask(mask: np.ndarray, box: Letterbox) -> Tensor:
    """A (H, W) bool mask of the original image -> (size, size) float 0/1 in the square (nearest, zero padding).

    Uses "nearest-exact" (pixel-centre) sampling so the mask stays aligned with the resized image.
    """
    if not isinstance(mask, np.ndarray) or mask.ndim != 2:
        description = f"shape {mask.shape}" if isinstance(mask, np.ndarray) else type(mask).__name__
        raise ImageError(f"mask must be a 2-D (H, W) array, got {description}")
    expected = _resized_shape(mask.shape[0], mask.shape[1], box.size)
    if expected != (box.height, box.width):
        raise ImageError(
            f"mask of shape {mask.shape} does not belong to this letterbox ({box.height}x{box.width} content)"
        )
    values = torch.from_numpy(mask.astype(np.float32))[None, None]
    values = F.interpolate(values, size=(box.height, box.width), mode="nearest-exact")[0, 0]
    square = torch.zeros(box.size, box.size)
    square[box.offset_y : box.offset_y + box.height, box.offset_x : box.offset_x + box.width] = values
    return square


def _resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(new_height, new_width) after scaling the long side to ``size``; never below one pixel."""
    scale = size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _place(
    height: int, width: int, size: int, placement: str | tuple[int, int], generator: torch.Generator | None
) -> Letterbox:
    """Compute the Letterbox of an height x width image for the requested placement."""
    if height < 1 or width < 1:
        raise ImageError(f"image of shape ({height}, {width}) is empty")
    new_height, new_width = _resized_shape(height, width, size)
    free_x, free_y = size - new_width, size - new_height
    if placement == "center":
        offset_x, offset_y = free_x // 2, free_y // 2
    elif placement == "random":
        offset_x = int(torch.randint(0, free_x + 1, (), generator=generator))
        offset_y = int(torch.randint(0, free_y + 1, (), generator=generator))
    elif isinstance(placement, (tuple, list)) and len(placement) == 2:
        offset_x, offset_y = (int(value) for value in placement)
        if not (0 <= offset_x <= free_x and 0 <= offset_y <= free_y):
            raise ConfigError(
                f"placement {placement} puts the {new_width}x{new_height} image outside the {size}x{size} square"
            )
    else:
        raise ConfigError(f"placement must be 'center', 'random' or (offset_x, offset_y), got {placement!r}")
    return Letterbox(
        offset_x=offset_x,
        offset_y=offset_y,
        width=new_width,
        height=new_height,
        size=size,
        original_width=width,
        original_height=height,
    )
