"""Evaluation protocols: in which frame predicted and GT masks are compared (metrics.md, "Protocols").

Published numbers were not all computed at the original image resolution; a protocol names the
frame, and every results file names its protocol.

- ``standard`` (default): masks at the original image resolution; the prediction's own no-target
  decision (``Prediction.no_target``).
- ``ssp_sam_release``: the released SSP-SAM evaluator's frame, the padded SAM frame of S/2 x S/2
  pixels (512 x 512 for SAM's 1024 input). The prediction is its padded-frame mask
  (sigmoid(logit) >= 0.5, as the release thresholds it); "no target" means fewer than
  ``no_target_pixels`` pixels in that frame (50 for the released models). The GT goes through the
  release's own processing (:func:`release_gt_frame`). The release's arithmetic is added to the
  standard one (``SSPSAMReleaseMetrics``).
- ``rela``: ReLA's gRefCOCO evaluation at 480 x 480 (its refcoco_mapper.py with INPUT.IMAGE_SIZE
  480): the GT annotations, crowd ones left out, are transformed to that frame and rasterised
  there (:func:`rela_gt_frame`); the prediction's logits are resized bilinearly to it (ReLA
  upsamples its logits to its 480 x 480 input the same way) and thresholded at 0; the
  prediction's own no-target decision.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import pycocotools.mask as mask_utils
import torch
import torch.nn.functional as F
from PIL import Image

from ..backbones.sam_frames import release_gt_frame
from ..data.masks import CocoSegmentationMask, segmentation_to_rles
from ..data.records import ReferringSample
from ..errors import ConfigError, DatasetError
from ..predictor import Prediction

PROTOCOLS = ("standard", "ssp_sam_release", "rela")
RELA_SIZE = 480


def check_protocol(name: object) -> str:
    """``name`` if it is one of :data:`PROTOCOLS`; else ConfigError listing them."""
    if name not in PROTOCOLS:
        raise ConfigError(f"protocol: unknown protocol {name!r}; expected one of {', '.join(PROTOCOLS)}")
    return name


def _nearest_resize(mask: np.ndarray, size: int) -> np.ndarray:
    """bool (H, W) -> bool (size, size) with PIL's nearest filter (detectron2's resize of a raster mask)."""
    image = Image.fromarray(np.asarray(mask, dtype=np.uint8))
    return np.asarray(image.resize((size, size), Image.Resampling.NEAREST)) > 0


def rela_gt_frame(sample: ReferringSample, size: int = RELA_SIZE) -> np.ndarray:
    """The GT of ``sample`` -> bool (size, size) as ReLA's mapper makes it.

    Annotations with iscrowd = 1 are not part of it. The gRefCOCO reader already leaves them out
    of the target; RefCOCO-family refs never point to one in the data ReLA evaluates (its mapper
    drops crowd annotations and then fails on a target left empty). Polygons are scaled by
    (size / W, size / H) and rasterised at size x size by pycocotools (detectron2's
    ResizeTransform on polygons); RLE segmentations and masks of other sources are decoded at the
    original size and resized with the nearest filter (its transform of raster masks). The union
    of the annotations is the GT.
    """
    height, width = sample.image_size
    if not isinstance(sample.target, CocoSegmentationMask):
        return _nearest_resize(sample.mask(), size)
    scale = np.array([size / width, size / height])
    frame = np.zeros((size, size), dtype=bool)
    rles = []
    for label, segmentation in sample.target.parts:
        if isinstance(segmentation, (list, tuple)) and not any(isinstance(item, dict) for item in segmentation):
            try:
                scaled = [(np.asarray(polygon, dtype=np.float64).reshape(-1, 2) * scale).ravel().tolist() for polygon in segmentation]
            except (TypeError, ValueError):
                raise DatasetError(f"{label}: a polygon must be an even-length flat list of numbers") from None
            rles += segmentation_to_rles(scaled, size, size, label)
        else:  # an RLE, or a list of RLEs (refclef)
            decoded = mask_utils.decode(mask_utils.merge(segmentation_to_rles(segmentation, height, width, label)))
            frame |= _nearest_resize(decoded, size)
    if rles:
        frame |= mask_utils.decode(mask_utils.merge(rles)).astype(bool)
    return frame


class Protocol(ABC):
    """Brings a prediction and its GT into the frame where they are compared."""

    name: str

    @abstractmethod
    def ground_truth(self, sample: ReferringSample) -> np.ndarray:
        """The sample's GT in this frame, bool (h, w)."""

    @abstractmethod
    def prediction(self, prediction: Prediction) -> tuple[np.ndarray, bool]:
        """The predicted mask in this frame, bool (h, w), and the no-target decision."""


class StandardProtocol(Protocol):
    """Original image resolution; the prediction's own mask and no-target decision."""

    name = "standard"

    def ground_truth(self, sample: ReferringSample) -> np.ndarray:
        return sample.mask()

    def prediction(self, prediction: Prediction) -> tuple[np.ndarray, bool]:
        return prediction.mask, bool(prediction.no_target)


class ReleaseProtocol(Protocol):
    """The released evaluator's padded SAM frame (S/2 x S/2); see the module docstring."""

    name = "ssp_sam_release"

    def __init__(self, sam_image_size: int, no_target_pixels: int) -> None:
        self.sam_image_size = sam_image_size
        self.no_target_pixels = no_target_pixels

    def ground_truth(self, sample: ReferringSample) -> np.ndarray:
        return release_gt_frame(sample.mask(), self.sam_image_size)

    def prediction(self, prediction: Prediction) -> tuple[np.ndarray, bool]:
        mask = (torch.sigmoid(torch.from_numpy(prediction.padded_logits)) >= 0.5).numpy()
        return mask, int(mask.sum()) < self.no_target_pixels


class RelaProtocol(Protocol):
    """ReLA's 480 x 480 frame; the prediction's own no-target decision."""

    name = "rela"

    def __init__(self, size: int = RELA_SIZE) -> None:
        self.size = size

    def ground_truth(self, sample: ReferringSample) -> np.ndarray:
        return rela_gt_frame(sample, self.size)

    def prediction(self, prediction: Prediction) -> tuple[np.ndarray, bool]:
        logits = torch.from_numpy(prediction.logits)[None, None]
        resized = F.interpolate(logits, (self.size, self.size), mode="bilinear", align_corners=False)
        return (resized[0, 0] > 0).numpy(), bool(prediction.no_target)


def make_protocol(name: str, sam_image_size: int, no_target_pixels: int) -> Protocol:
    """The protocol called ``name`` for a model with this SAM input size and no-target threshold."""
    check_protocol(name)
    if name == "ssp_sam_release":
        return ReleaseProtocol(sam_image_size, no_target_pixels)
    if name == "rela":
        return RelaProtocol()
    return StandardProtocol()
