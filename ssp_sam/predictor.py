"""Single-image inference: load a model once, then segment any number of expressions per image.

The frozen CLIP and SAM image encoders run once per image; the text encoder and everything after
the encoders run batched over the expressions (in chunks of ``max_batch``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .backbones.clip_tokenizer import CLIPTokenizer
from .backbones.sam import SAMImageTransform, padded_frame_to_original, valid_region
from .config import ModelConfig
from .errors import ConfigError, ExpressionError, ImageError
from .image_io import ImageLike, load_image
from .letterbox import Letterbox, letterbox_image
from .model import SSPSAM

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "shapeworld_default"


@dataclass
class EncodedImage:
    """The encoder outputs of one image, reusable for any number of expressions.

    clip_tokens: (1, 1+N, D) CLIP-Surgery tokens. sam_embedding: (1, C, h, w).
    """

    clip_tokens: Tensor
    sam_embedding: Tensor
    letterbox: Letterbox
    input_size: tuple[int, int]  # the image's size inside SAM's padded square
    original_size: tuple[int, int]  # (H, W)


@dataclass
class Prediction:
    """The result for one expression.

    mask: (H, W) bool at the original resolution (logits > 0).
    logits: (H, W) float32 mask logits at the original resolution.
    box: (4,) REC box, xyxy in image pixels.
    score: mean foreground probability inside the mask (0 for an empty mask).
    no_target: True when the mask has fewer than ``no_target_pixels`` pixels in the image's part of
        the padded SAM frame (SSP-SAM has no no-target head; "no target" is read off an almost
        empty mask; pixels set in the padding only are not a target).
    padded_area: mask pixels in the whole padded SAM frame, padding included (the quantity the
        release's evaluation counts for its own no-target rule).
    padded_logits: (S/2, S/2) float32 mask logits in the whole padded SAM frame (512 x 512 for
        SAM's 1024 input), which the release's evaluation thresholds and scores.
    """

    expression: str
    mask: np.ndarray
    logits: np.ndarray
    box: np.ndarray
    score: float
    no_target: bool
    padded_area: int
    padded_logits: np.ndarray


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """"auto"/None -> CUDA when available, else CPU.

    Raises:
        ConfigError: not a device name, or a CUDA device this machine does not have.
    """
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device: {device!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"device: {device!r} is not available here ({torch.cuda.device_count()} CUDA devices)")
    return resolved


class Predictor:
    """Segment referring expressions in single images.

    Example::

        predictor = Predictor.from_checkpoint()          # the shipped ShapeWorld model
        results = predictor.predict("scene.png", ["the red circle", "the blue star"])
    """

    def __init__(self, model: SSPSAM, device: Union[str, torch.device, None] = None, max_batch: int = 32) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.max_batch = max_batch
        self.tokenizer = CLIPTokenizer(context_length=model.clip.context_length, append_period=model.config.append_period)
        self.sam_transform = SAMImageTransform(model.sam_image_size)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: Union[str, os.PathLike, None] = None,
        model_config: Union[ModelConfig, Mapping, None] = None,
        device: Union[str, torch.device, None] = None,
    ) -> "Predictor":
        """Load our checkpoint or a released one (``None``: the shipped ShapeWorld model)."""
        from .checkpoint import load_model

        return cls(load_model(checkpoint or DEFAULT_CHECKPOINT, model_config), device=device)

    @torch.no_grad()
    def encode_image(
        self, image: ImageLike, sam_embedding: Tensor | None = None, exif_orientation: bool = False
    ) -> EncodedImage:
        """Run the frozen image encoders once on ``image`` (path, PIL image or array).

        Args:
            sam_embedding: (C, h, w) or (1, C, h, w) SAM embedding of this image from a cache; SAM's
                image encoder runs only when it is not given.
            exif_orientation: turn a photo as its EXIF tag says (what :meth:`predict` does with a
                path or PIL image); False reads the stored pixels, as dataset annotations need.

        Raises:
            ImageError: unreadable, or so elongated that SAM's resize would leave its short side
                0 pixels wide (more than 2 x SAM's input size times longer than wide).
        """
        label = str(image) if isinstance(image, (str, os.PathLike)) else None
        rgb = load_image(image, name=label, exif_orientation=exif_orientation)
        input_size = self.sam_transform.input_size_for(rgb.shape[:2])
        if min(input_size) < 1:
            height, width = rgb.shape[:2]
            raise ImageError(
                f"{label or 'image'}: a {width}x{height} image is too elongated for SAM's {self.model.sam_image_size}-pixel "
                f"input (its short side would shrink to 0 pixels; the long side may be at most "
                f"{2 * self.model.sam_image_size} times the short one)"
            )
        clip_pixels, letterbox = letterbox_image(rgb, self.model.clip.image_size)
        clip_tokens = self.model.encode_clip_image(clip_pixels.unsqueeze(0).to(self.device))
        if sam_embedding is None:
            sam_pixels, _ = self.sam_transform(rgb)
            sam_embedding = self.model.encode_sam_image(sam_pixels.unsqueeze(0).to(self.device))
        sam_embedding = sam_embedding.reshape(1, *sam_embedding.shape[-3:]).to(self.device, torch.float32)
        return EncodedImage(clip_tokens, sam_embedding, letterbox, tuple(input_size), rgb.shape[:2])

    @torch.no_grad()
    def predict(self, image: Union[ImageLike, EncodedImage], expressions: Union[str, Sequence[str]]) -> list[Prediction]:
        """Segment every expression in ``image``; returns one Prediction per expression, in order.

        A path or PIL image is a user's photo: it is turned as its EXIF orientation tag says, so the
        masks match the picture as viewers show it.
        """
        if isinstance(expressions, str):
            expressions = [expressions]
        if len(expressions) == 0:
            raise ExpressionError("expressions: give at least one expression")
        tokens = self.tokenizer(expressions)  # bad expressions fail before the costly image encoding
        encoded = image if isinstance(image, EncodedImage) else self.encode_image(image, exif_orientation=True)
        results: list[Prediction] = []
        for start in range(0, len(expressions), self.max_batch):
            chunk = tokens[start : start + self.max_batch].to(self.device)
            text = self.model.encode_text(chunk)
            output = self.model.decode(encoded.clip_tokens, encoded.sam_embedding, text)
            logits = padded_frame_to_original(
                output.mask_logits, encoded.input_size, encoded.original_size, self.model.sam_image_size
            )[:, 0]
            boxes = encoded.letterbox.box_to_image(output.boxes.float().cpu())
            padded_logits = output.mask_logits[:, 0].float().cpu()
            foreground = output.mask_logits > 0
            padded_areas = foreground.flatten(1).sum(-1).cpu()
            image_areas = valid_region(foreground, encoded.input_size).flatten(1).sum(-1).cpu()
            for offset in range(chunk.shape[0]):
                results.append(self._prediction(
                    expressions[start + offset], logits[offset], boxes[offset], int(padded_areas[offset]), int(image_areas[offset]),
                    padded_logits[offset],
                ))
        return results

    def _prediction(
        self, expression: str, logits: Tensor, box: Tensor, padded_area: int, image_area: int, padded_logits: Tensor
    ) -> Prediction:
        logits = logits.float().cpu()
        mask = logits > 0
        score = float(logits.sigmoid()[mask].mean()) if mask.any() else 0.0
        return Prediction(
            expression=expression,
            mask=mask.numpy(),
            logits=logits.numpy(),
            box=box.numpy(),
            score=score,
            no_target=image_area < self.model.config.no_target_pixels,
            padded_area=padded_area,
            padded_logits=padded_logits.numpy(),
        )
