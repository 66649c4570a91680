"""Overlays that let a person check a prediction at a glance."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor

from .backbones.sam import SAMImageTransform, padded_frame_to_original
from .letterbox import Letterbox

MASK_COLOUR = (255, 64, 160)
BOX_COLOUR = (64, 255, 255)


def overlay(
    image: np.ndarray,
    mask: np.ndarray,
    box_xyxy: np.ndarray | None = None,
    caption: str | None = None,
    alpha: float = 0.5,
) -> Image.Image:
    """Blend ``mask`` (H, W bool) over ``image`` (H, W, 3 uint8), outline the box, add a caption.

    The caption is drawn on a dark band under the picture so it never hides the mask.
    """
    base = image.astype(np.float32)
    tint = np.asarray(MASK_COLOUR, dtype=np.float32)
    blended = np.where(mask[..., None], (1 - alpha) * base + alpha * tint, base)
    canvas = Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    if box_xyxy is not None and np.all(np.isfinite(box_xyxy)):
        x0, y0, x1, y1 = (float(v) for v in box_xyxy)
        draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], outline=BOX_COLOUR, width=2)
    if caption:
        band = 18
        framed = Image.new("RGB", (canvas.width, canvas.height + band), (0, 0, 0))
        framed.paste(canvas, (0, 0))
        ImageDraw.Draw(framed).text((4, canvas.height + 3), caption, fill=(255, 255, 255))
        canvas = framed
    return canvas


def padded_prediction_overlay(
    image: np.ndarray, padded_logits: Tensor, box_cxcywh: Tensor, letterbox: Letterbox, sam_image_size: int, caption: str | None = None
) -> Image.Image:
    """:func:`overlay` of a raw model output: mask logits in SAM's padded frame, the box in CLIP's square.

    Args:
        image: (H, W, 3) uint8, the picture the model saw.
        padded_logits: (S/2, S/2) mask logits in SAM's padded frame (S = ``sam_image_size``).
        box_cxcywh: (4,) the REC box, normalised to CLIP's square, where ``letterbox`` placed the image.
    """
    input_size = SAMImageTransform(sam_image_size).input_size_for(image.shape[:2])
    logits = padded_frame_to_original(padded_logits[None, None].float(), input_size, image.shape[:2], sam_image_size)
    return overlay(image, (logits[0, 0] > 0).numpy(), letterbox.box_to_image(box_cxcywh.float()).numpy(), caption)
