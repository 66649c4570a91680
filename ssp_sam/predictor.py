"""Inference: load a model once, then segment any number of expressions per image, for one image or many.

The frozen CLIP and SAM image encoders run once per image (several images per call with
:meth:`Predictor.encode_prepared`); the text encoder and everything after the encoders run batched
over the expressions (in chunks of ``max_batch``, which may span several images with
:meth:`Predictor.predict_images`). What needs no model (reading the image, the letterbox, SAM's
resize) is :class:`ImagePreparer`, so that data-loader workers can do it ahead of the model.
``precision`` runs the encoders and the decoder under ``torch.autocast`` (``ssp_sam.engine.precision``);
the optional caches of ``ssp_sam.feature_cache`` skip CLIP for sentences and inputs seen before.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .backbones.clip_tokenizer import CLIPTokenizer
from .backbones.sam_frames import SAMImageTransform, padded_frame_to_original, valid_region
from .config import ModelConfig
from .engine.compilation import compiled_or_eager
from .engine.precision import Precision, resolve_precision
from .errors import ConfigError, ExpressionError, ImageError
from .feature_cache import ImageTokenCache, TextFeatureCache
from .image_io import ImageLike, load_image
from .letterbox import Letterbox, letterbox_image
from .model import SSPSAM

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "shapeworld_default"


@dataclass
class PreparedImage:
    """The model's inputs for one image, made on the CPU without the model (:class:`ImagePreparer`).

    clip_pixels: (3, S_clip, S_clip) letterboxed, CLIP-normalised (centred placement).
    sam_pixels: (3, S, S) SAM-preprocessed, or None when ``sam_embedding`` is given.
    sam_embedding: (C, h, w) SAM embedding from a cache, in its storage dtype, or None.
    name: the image's path (for messages and records), None for an in-memory image.
    """

    clip_pixels: Tensor
    sam_pixels: Optional[Tensor]
    sam_embedding: Optional[Tensor]
    letterbox: Letterbox
    input_size: tuple[int, int]  # the image's size inside SAM's padded square
    original_size: tuple[int, int]  # (H, W)
    name: Optional[str] = None


class ImagePreparer:
    """Image -> :class:`PreparedImage`: decoding, the CLIP letterbox and SAM's resize (no model needed)."""

    def __init__(self, clip_image_size: int, sam_image_size: int) -> None:
        self.clip_image_size = clip_image_size
        self.sam_image_size = sam_image_size
        self.sam_transform = SAMImageTransform(sam_image_size)

    def __call__(self, image: ImageLike, sam_embedding: Tensor | None = None, exif_orientation: bool = False) -> PreparedImage:
        """Read ``image`` (path, PIL image or array) and make the encoders' inputs.

        Args:
            sam_embedding: (C, h, w) or (1, C, h, w) SAM embedding of this image from a cache; SAM's
                input is only made when it is not given.
            exif_orientation: turn a photo as its EXIF tag says (what :meth:`Predictor.predict` and
                :meth:`Predictor.encode_image` do with a path or PIL image); False (the default here:
                the evaluator's data loaders) reads the stored pixels, as dataset annotations need.

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
                f"{label or 'image'}: a {width}x{height} image is too elongated for SAM's {self.sam_image_size}-pixel "
                f"input (its short side would shrink to 0 pixels; the long side may be at most "
                f"{2 * self.sam_image_size} times the short one)"
            )
        clip_pixels, letterbox = letterbox_image(rgb, self.clip_image_size)
        sam_pixels = self.sam_transform(rgb)[0] if sam_embedding is None else None
        if sam_embedding is not None:
            sam_embedding = sam_embedding.reshape(sam_embedding.shape[-3:])
        return PreparedImage(clip_pixels, sam_pixels, sam_embedding, letterbox, tuple(input_size), rgb.shape[:2], label)


@dataclass
class EncodedImage:
    """The encoder outputs of one image, reusable for any number of expressions.

    clip_tokens: (1, 1+N, D) CLIP-Surgery tokens. sam_embedding: (1, C, h, w) float32.
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
    """"auto"/None -> CUDA when available, else CPU; otherwise "cpu", "cuda" or "cuda:N".

    Raises:
        ConfigError: not a device name, a device type this code does not run on (mps, meta, xpu, ...),
            or a CUDA device this machine does not have.
    """
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device: {device!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ConfigError(f"device: {device!r} is not supported here (auto, cpu, cuda, cuda:N)")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"device: {device!r} is not available here ({torch.cuda.device_count()} CUDA devices)")
    return resolved


class Predictor:
    """Segment referring expressions in images.

    Example::

        predictor = Predictor.from_checkpoint()          # the shipped ShapeWorld model
        results = predictor.predict("scene.png", ["the red circle", "the blue star"])

    Args:
        precision: "fp32" (default), "bf16", "fp16" or "auto" (``resolve_precision``), or a
            resolved :class:`Precision`: the autocast region of the encoders and the decoder.
        text_cache / image_cache: frozen-feature caches (``ssp_sam.feature_cache``) to use, or None.
        compile: run the decoder (everything after the encoders) through ``torch.compile``, or
            eagerly with one warning where it cannot compile (``ssp_sam.engine.compilation``).
    """

    def __init__(
        self,
        model: SSPSAM,
        device: Union[str, torch.device, None] = None,
        max_batch: int = 32,
        precision: Union[str, Precision] = "fp32",
        text_cache: TextFeatureCache | None = None,
        image_cache: ImageTokenCache | None = None,
        compile: bool = False,
    ) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.max_batch = max_batch
        self.precision = precision if isinstance(precision, Precision) else resolve_precision(precision, self.device)
        self.text_cache = text_cache
        self.image_cache = image_cache
        self.compiled_decode = compiled_or_eager(self.model.decode, "compile: the decoder") if compile else None
        self.tokenizer = CLIPTokenizer(context_length=model.clip.context_length, append_period=model.config.append_period)
        self.preparer = ImagePreparer(model.clip.image_size, model.sam_image_size)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: Union[str, os.PathLike, None] = None,
        model_config: Union[ModelConfig, Mapping, None] = None,
        device: Union[str, torch.device, None] = None,
    ) -> "Predictor":
        """Load our checkpoint or a released one (``None``: the shipped ShapeWorld model)."""
        from .checkpoint import load_model

        device = resolve_device(device)  # a wrong device fails before the model is read
        return cls(load_model(checkpoint or DEFAULT_CHECKPOINT, model_config), device=device)

    @torch.no_grad()
    def encode_image(
        self, image: ImageLike, sam_embedding: Tensor | None = None, exif_orientation: bool = True
    ) -> EncodedImage:
        """Run the frozen image encoders once on ``image`` (path, PIL image or array).

        A path or PIL image is turned as its EXIF orientation says, as :meth:`predict` turns it, so
        ``predict(encode_image(image), ...)`` and ``predict(image, ...)`` give the same masks;
        ``exif_orientation=False`` reads the stored pixels (dataset images, as annotated).
        ``sam_embedding`` as for :class:`ImagePreparer`, whose ImageError this raises.
        """
        return self.encode_prepared([self.preparer(image, sam_embedding, exif_orientation)])[0]

    @torch.no_grad()
    def encode_prepared(self, images: Sequence[PreparedImage]) -> list[EncodedImage]:
        """The image encoders on several prepared images: one CLIP call, one SAM call for those without an embedding."""
        model = self.model
        with self.precision.autocast(self.device):
            clip_pixels = torch.stack([image.clip_pixels for image in images])
            if self.image_cache is not None:
                clip_tokens = self.image_cache.encode(model, clip_pixels)
            else:
                clip_tokens = model.encode_clip_image(clip_pixels.to(self.device, non_blocking=True))
            uncached = [index for index, image in enumerate(images) if image.sam_embedding is None]
            computed = iter(())
            if uncached:
                sam_pixels = torch.stack([images[index].sam_pixels for index in uncached])
                computed = iter(model.encode_sam_image(sam_pixels.to(self.device, non_blocking=True)))
        encoded = []
        for index, image in enumerate(images):
            embedding = image.sam_embedding if image.sam_embedding is not None else next(computed)
            encoded.append(EncodedImage(
                clip_tokens[index : index + 1],
                embedding.reshape(1, *embedding.shape[-3:]).to(self.device, torch.float32, non_blocking=True),
                image.letterbox, image.input_size, image.original_size,
            ))
        return encoded

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
        encoded = image if isinstance(image, EncodedImage) else self.encode_image(image)
        return self._predict_tokenized([encoded], [expressions], tokens)[0]

    @torch.no_grad()
    def predict_images(
        self, images: Sequence[EncodedImage], expressions: Sequence[Sequence[str]]
    ) -> list[list[Prediction]]:
        """Segment ``expressions[i]`` in ``images[i]`` for every i; the decoder runs on chunks of
        ``max_batch`` expressions taken in order, across images. Returns the predictions per image."""
        return self._predict_tokenized(images, expressions)

    def _predict_tokenized(
        self, images: Sequence[EncodedImage], expressions: Sequence[Sequence[str]], tokens: Tensor | None = None
    ) -> list[list[Prediction]]:
        """:meth:`predict_images`; ``tokens`` (E, L): the expressions' token ids in order, if already made."""
        owners = [index for index, texts in enumerate(expressions) for _ in texts]
        texts = [text for group in expressions for text in group]
        if tokens is None and texts:
            tokens = self.tokenizer(texts)
        predictions: list[list[Prediction]] = [[] for _ in images]
        for start in range(0, len(texts), self.max_batch):
            rows = owners[start : start + self.max_batch]
            first, last = rows[0], rows[-1]
            chunk_tokens = tokens[start : start + len(rows)]
            image_of = None  # one image: its encodings are shared by every expression
            clip_tokens, sam_embeddings = images[first].clip_tokens, images[first].sam_embedding
            if first != last:  # several: each image's encodings once, and the image of each expression
                image_of = torch.tensor([row - first for row in rows], device=self.device)
                clip_tokens = torch.cat([image.clip_tokens for image in images[first : last + 1]])
                sam_embeddings = torch.cat([image.sam_embedding for image in images[first : last + 1]])
            with self.precision.autocast(self.device):
                if self.text_cache is not None:
                    text = self.text_cache.encode(self.model, chunk_tokens)
                else:
                    text = self.model.encode_text(chunk_tokens.to(self.device, non_blocking=True))
                output = (self.compiled_decode or self.model.decode)(clip_tokens, sam_embeddings, text, image_of)
            mask_logits, boxes = output.mask_logits.float(), output.boxes.float()
            for owner in range(first, last + 1):
                at = [offset for offset, row in enumerate(rows) if row == owner]
                if at:
                    span = slice(at[0], at[-1] + 1)
                    predictions[owner] += self._predictions(
                        images[owner], texts[start + at[0] : start + at[-1] + 1], mask_logits[span], boxes[span]
                    )
        return predictions

    def _predictions(self, image: EncodedImage, texts: Sequence[str], mask_logits: Tensor, boxes: Tensor) -> list[Prediction]:
        """Predictions of K expressions of one image from their (K, 1, S/2, S/2) logits and (K, 4) boxes."""
        logits = padded_frame_to_original(
            mask_logits, image.input_size, image.original_size, self.model.sam_image_size, self.model.config.mask_target
        )[:, 0]
        logits = logits.cpu()
        boxes = image.letterbox.box_to_image(boxes.cpu())
        padded_logits = mask_logits[:, 0].cpu()
        foreground = mask_logits > 0
        padded_areas = foreground.flatten(1).sum(-1).tolist()
        image_areas = valid_region(foreground, image.input_size).flatten(1).sum(-1).tolist()
        results = []
        for offset, text in enumerate(texts):
            mask = logits[offset] > 0
            score = float(logits[offset].sigmoid()[mask].mean()) if mask.any() else 0.0
            results.append(Prediction(
                expression=text,
                mask=mask.numpy(),
                logits=logits[offset].numpy(),
                box=boxes[offset].numpy(),
                score=score,
                no_target=image_areas[offset] < self.model.config.no_target_pixels,
                padded_area=padded_areas[offset],
                padded_logits=padded_logits[offset].numpy(),
            ))
        return results
