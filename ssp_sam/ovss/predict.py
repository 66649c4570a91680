"""Open-vocabulary segmentation of one image for a list of class names, and the files a person reads.

:class:`OVSSPredictor` runs any OVSS model (CAT-Seg, + SAM vote, SAM-MI) on one image of any size:

- ``inference="sliding"``: CAT-Seg's sliding window (:func:`~ssp_sam.ovss.sliding_window.sliding_window_inference`)
  with the model's input side as the window, ``overlap`` 0.333 and the image resized to window + stride
  (384 -> 640, CAT-Seg's evaluation setting; 2 x 2 crops plus the global view);
- ``inference="whole"``: the image resized (bilinear, aspect ratio not kept, as CAT-Seg without the
  sliding window) to the model's input, the probabilities resized back;
- ``inference="auto"`` (default): sliding when the image's longer side exceeds the window, else whole.

``precision`` runs the model under autocast as evaluation does (``ssp_sam.engine.precision``: auto is
bf16 or fp16 on CUDA); the probabilities are float32 either way.

The label map is the argmax over the given classes of the per-class probabilities at the image's own
size (CAT-Seg has no background: every pixel gets a class, as in evaluation; give a class such as
"background" when the model knows one). With ``none_below`` set, pixels whose highest probability is
below it get :func:`none_value` instead ("none of these classes").

:func:`write_ovss_prediction` writes ``label_map.png``, ``overlay.png`` (classes tinted, legend below),
one ``mask_NN_<name>.png`` per class and ``summary.json`` (last), each file atomically, after removing
the files an earlier export named in the same folder.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..engine.precision import resolve_precision
from ..errors import ConfigError, DatasetError
from ..export import save_png
from ..fileio import write_json
from ..image_io import ImageLike, load_image
from ..outputs import check_output_dir
from ..predictor import resolve_device
from ..visualize import class_colours, label_overlay
from .data.classes import check_class_names, first_synonym
from .engine.checkpoint import default_class_names, load_ovss_model
from .model import OVSSModel
from .resize import resize_image, resize_probabilities
from .sam_vote import CATSegSAMVote
from .sliding_window import default_out_size, sliding_window_inference

# The ShapeWorld SAM-MI the README's demo uses once it is shipped (issue 14, item 5); scripts/predict.py
# takes it when classes=[...] is given without a checkpoint.
DEFAULT_OVSS_CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "shapeworld_ovss"
INFERENCE_MODES = ("auto", "sliding", "whole")
SUMMARY_FILE, LABEL_MAP_FILE, OVERLAY_FILE = "summary.json", "label_map.png", "overlay.png"
SUMMARY_KIND = "ovss"
_OUR_MASK = re.compile(r"mask_\d{2,}(_[a-z0-9-]*)?\.png")  # the names write_ovss_prediction gives its masks


def none_value(num_classes: int) -> int:
    """The label-map value of "none of the classes": 255 in an 8-bit PNG, 65535 when 255 is a class index."""
    return 255 if num_classes <= 255 else 65535


def read_alike(name: str) -> str:
    """What the text encoder sees of a class name: its first synonym ("tv, television" -> "tv"),
    lower case, runs of whitespace as one space (CLIP's tokenizer lower-cases and cleans whitespace)."""
    return " ".join(first_synonym(name).lower().split())


def check_user_classes(class_names: Any) -> tuple[str, ...]:
    """A user's class list, checked before any model is loaded.

    Besides the dataset lists' rules (non-empty, non-blank strings, no name twice) two names that the
    text encoder reads alike ("Cat" and "cat ", "bag, sack" and "bag") are refused: they would get
    the same text embedding, hence the same probabilities, and the second would never win a pixel.

    Raises:
        DatasetError: one line naming ``classes`` and the offending entries.
    """
    if isinstance(class_names, str):
        class_names = [class_names]
    names = check_class_names(class_names, "classes")
    first: dict[str, int] = {}
    for index, name in enumerate(names):
        other = first.setdefault(read_alike(name), index)
        if other != index:
            raise DatasetError(
                f"classes: duplicate class name: {name!r} (class {index}) reads as {names[other]!r} (class {other}) "
                f"to the text encoder ({read_alike(name)!r})"
            )
    return names


def check_inference(mode: str, overlap: float, none_below: float | None) -> None:
    """Raise ConfigError (naming the ``ovss.*`` key) for a mode, overlap or threshold that cannot be used."""
    if mode not in INFERENCE_MODES:
        raise ConfigError(f"ovss.inference: must be one of {', '.join(INFERENCE_MODES)}, got {mode!r}")
    if not 0.0 <= overlap < 1.0:
        raise ConfigError(f"ovss.overlap: must lie in [0, 1), got {overlap}")
    if none_below is not None and not 0.0 <= none_below <= 1.0:
        raise ConfigError(f"ovss.none_below: a probability in [0, 1] or null, got {none_below}")


@dataclass
class OVSSPrediction:
    """The result for one image.

    probabilities: (T, H, W) float32 per-class probabilities at the image's size.
    label_map: (H, W) int64, class index per pixel, :func:`none_value` where ``none_below`` says none.
    inference: "sliding" or "whole", as run.
    """

    class_names: tuple[str, ...]
    probabilities: np.ndarray
    label_map: np.ndarray
    inference: str

    @property
    def none_value(self) -> int:
        return none_value(len(self.class_names))

    def mask(self, index: int) -> np.ndarray:
        """(H, W) bool: the pixels labelled class ``index``."""
        return self.label_map == index


class OVSSPredictor:
    """An OVSS model in eval mode on a device, with the inference settings of the module docstring."""

    def __init__(
        self,
        model: OVSSModel,
        device: torch.device | str = "cpu",
        inference: str = "auto",
        overlap: float = 0.333,
        none_below: float | None = None,
        precision: str = "fp32",
    ) -> None:
        check_inference(inference, overlap, none_below)
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device, "ovss.precision")
        self.model = model.to(self.device).eval()
        self.inference = inference
        self.overlap = overlap
        self.none_below = none_below

    @property
    def window(self) -> int:
        return self.model.image_size

    def sliding_size(self) -> int:
        """The side the image is resized to for the sliding window: window + stride (2 x 2 crops, CAT-Seg's 640 at 384)."""
        return default_out_size(self.window, self.overlap)

    def mode_for(self, height: int, width: int) -> str:
        if self.inference != "auto":
            return self.inference
        return "sliding" if max(height, width) > self.window else "whole"

    @torch.inference_mode()
    def probabilities(self, pixels: Tensor, text: Tensor, mode: str) -> Tensor:
        """(3, H, W) RGB on 0..255 -> (T, H, W) float32 probabilities, by ``mode`` ("sliding" or "whole")."""

        def predict(images: Tensor) -> Tensor:
            with self.precision.autocast(self.device):
                return self.model.predict(images, text).float()

        if mode == "sliding" and isinstance(self.model, CATSegSAMVote):  # one vote per image (sam_vote.py)
            return self.model.sliding_window_vote(
                pixels, text, self.window, self.overlap, self.sliding_size(), lambda: self.precision.autocast(self.device)
            )[0]
        if mode == "sliding":
            return sliding_window_inference(predict, pixels, self.window, self.overlap, self.sliding_size())
        # As the evaluator's whole-image protocol: antialiased resize to the square, bilinear back.
        square = resize_image(pixels, (self.window, self.window))[None]
        return resize_probabilities(predict(square)[0], tuple(pixels.shape[-2:]))

    def predict(self, image: ImageLike, class_names: Sequence[str] | str) -> OVSSPrediction:
        """Segment ``image`` (path, PIL image or array; a photo is turned as its EXIF tag says) into ``class_names``.

        Raises:
            DatasetError: a bad class list (:func:`check_user_classes`).
            ImageError: an unreadable image (named).
        """
        names = check_user_classes(class_names)
        label = str(image) if isinstance(image, (str, os.PathLike)) else None
        rgb = load_image(image, name=label, exif_orientation=True)
        mode = self.mode_for(*rgb.shape[:2])
        with torch.inference_mode(), self.precision.autocast(self.device):
            text = self.model.encode_classes(names)
        with torch.inference_mode():
            pixels = torch.from_numpy(rgb).to(self.device).permute(2, 0, 1).float()
            probabilities = self.probabilities(pixels, text, mode)
            best, labels = probabilities.max(dim=0)
            if self.none_below is not None:
                labels = torch.where(best < self.none_below, torch.full_like(labels, none_value(len(names))), labels)
        return OVSSPrediction(names, probabilities.float().cpu().numpy(), labels.cpu().numpy().astype(np.int64), mode)


# ---- files --------------------------------------------------------------------------------------


def mask_file_name(index: int, name: str) -> str:
    """``mask_NN_<name as lower-case letters, digits and dashes, at most 40>.png``."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40].strip("-")
    return f"mask_{index:02d}" + (f"_{slug}" if slug else "") + ".png"


def _remove_previous_export(out_dir: Path) -> None:
    """Delete the OVSS export an earlier run left in ``out_dir`` (summary first, then the files it names).

    Only the names this module gives are deleted: a foreign or hand-edited summary removes nothing else.
    """
    summary_path = out_dir / SUMMARY_FILE
    try:
        previous = json.loads(summary_path.read_text())
        if previous.get("kind") != SUMMARY_KIND:
            return
        named = [previous["label_map"], previous["overlay"], *(entry["mask"] for entry in previous["classes"])]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # no earlier OVSS export of ours
    summary_path.unlink()
    for name in named:
        if isinstance(name, str) and (name in (LABEL_MAP_FILE, OVERLAY_FILE) or _OUR_MASK.fullmatch(name)):
            (out_dir / name).unlink(missing_ok=True)


def label_map_image(prediction: OVSSPrediction) -> Image.Image:
    """The label map as a PNG-ready image: 8-bit for up to 255 classes (none = 255), else 16-bit (none = 65535)."""
    if len(prediction.class_names) <= 255:
        return Image.fromarray(prediction.label_map.astype(np.uint8))  # mode L
    return Image.fromarray(prediction.label_map.astype(np.uint16))  # mode I;16


def write_ovss_prediction(
    image: np.ndarray, prediction: OVSSPrediction, out_dir: str | os.PathLike, image_name: str, checkpoint: str
) -> dict:
    """Write the label map, the overlay, one 0/255 mask per class and ``summary.json`` (last) into ``out_dir``.

    Args:
        image: (H, W, 3) uint8, the picture as the model saw it (EXIF-turned).
        image_name, checkpoint: how the summary names the image and the model.

    Returns:
        the summary: image, checkpoint, inference, the none value, the files and per class its index,
        name, mask file, pixel count and overlay colour.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_previous_export(out_dir)
    colours = class_colours(len(prediction.class_names))
    save_png(label_map_image(prediction), out_dir / LABEL_MAP_FILE)
    save_png(label_overlay(image, prediction.label_map, prediction.class_names, colours), out_dir / OVERLAY_FILE)
    classes = []
    for index, name in enumerate(prediction.class_names):
        mask = prediction.mask(index)
        file_name = mask_file_name(index, name)
        save_png(Image.fromarray(mask.astype(np.uint8) * 255), out_dir / file_name)
        classes.append({"index": index, "name": name, "mask": file_name, "pixels": int(mask.sum()), "colour": colours[index].tolist()})
    summary = {
        "kind": SUMMARY_KIND,
        "image": image_name,
        "checkpoint": checkpoint,
        "inference": prediction.inference,
        "label_map": LABEL_MAP_FILE,
        "none_value": prediction.none_value,
        "none_pixels": int((prediction.label_map == prediction.none_value).sum()),
        "overlay": OVERLAY_FILE,
        "classes": classes,
    }
    write_json(out_dir / SUMMARY_FILE, summary)
    return summary


def predict_to_folder(
    checkpoint: str | os.PathLike,
    image_path: str | os.PathLike,
    class_names: Any,
    out_dir: str | os.PathLike,
    device: str = "auto",
    inference: str = "auto",
    overlap: float = 0.333,
    none_below: float | None = None,
    overrides: dict | None = None,
    precision: str = "auto",
) -> dict:
    """``scripts/predict.py`` with an OVSS checkpoint: every input checked, then the model loaded and run, then the files written.

    Args:
        class_names: the classes to segment; None: the class list of the dataset the checkpoint was trained on
            (:func:`~ssp_sam.ovss.engine.checkpoint.default_class_names`: with any names held out of training).
        overrides: changes to the stored model config (:func:`~ssp_sam.ovss.engine.checkpoint.load_ovss_model`).

    Returns:
        the summary written (:func:`write_ovss_prediction`).
    """
    check_output_dir(out_dir, "out_dir")
    if class_names is None:
        class_names = default_class_names(checkpoint)
        if not class_names:
            raise ConfigError(f"classes: {checkpoint} stores no class list; give classes=[...]")
    names = check_user_classes(class_names)
    check_inference(inference, overlap, none_below)
    resolved = resolve_device(device)
    resolve_precision(precision, resolved, "ovss.precision")
    rgb = load_image(image_path, name=str(image_path), exif_orientation=True)  # a bad file fails before the model loads
    loaded = load_ovss_model(checkpoint, resolved, overrides)
    predictor = OVSSPredictor(loaded.model, resolved, inference, overlap, none_below, precision)
    prediction = predictor.predict(rgb, names)
    return write_ovss_prediction(rgb, prediction, out_dir, str(image_path), str(checkpoint))
