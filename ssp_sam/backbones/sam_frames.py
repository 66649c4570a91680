"""SAM's image transform and the three frames a mask lives in.

- :class:`SAMImageTransform`: SamPredictor's resize followed by ``Sam.preprocess``, as one call.
- The OVSS models' way in: :func:`resize_image` (their input square), :func:`sam_input` (that square
  to SAM's input) and :class:`ModelInputTransform` (both, as the OVSS embedding cache's preprocessing).
- SAM's low-resolution logits (``4 * S / patch`` per side), the "padded frame" (the letterboxed
  ``S x S`` input at half resolution, where training losses are computed) and the original image:
  :func:`upscale_to_padded_frame`, :func:`padded_frame_to_original`, and the ground truth's way into
  the padded frame, one per training target (``MASK_TARGET_BUILDERS``: :func:`release_gt_frame`,
  :func:`mask_to_padded_frame`, :func:`mask_to_area_frame`), whose choice the mapping back follows.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from segment_anything.utils.transforms import ResizeLongestSide

from ..errors import ImageError

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class SAMImageTransform:
    """SAM's input pipeline: what ``SamPredictor.set_image`` then ``Sam.preprocess`` compute.

    The long side is resized to ``image_size`` by ``ResizeLongestSide`` (PIL bilinear on uint8),
    pixels are normalised with SAM's mean / std on the 0..255 scale, and the result is padded with
    zeros on the right and bottom to ``image_size x image_size``.
    """

    def __init__(self, image_size: int = 1024) -> None:
        self.image_size = image_size
        self.resize = ResizeLongestSide(image_size)
        self.pixel_mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
        self.pixel_std = torch.tensor(PIXEL_STD).view(3, 1, 1)

    def input_size_for(self, original_size: Tuple[int, int]) -> Tuple[int, int]:
        """(h, w) of the resized image inside the padded square, for an (H, W) original."""
        return ResizeLongestSide.get_preprocess_shape(original_size[0], original_size[1], self.image_size)

    def __call__(self, image: np.ndarray) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """uint8 RGB (H, W, 3) -> (normalised padded image (3, S, S) float32, input_size (h, w))."""
        if not isinstance(image, np.ndarray):
            raise ImageError(f"image: expected a uint8 RGB array (H, W, 3), got {type(image).__name__}")
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ImageError(f"image: expected a uint8 RGB array (H, W, 3), got {image.dtype} {image.shape}")
        resized = torch.from_numpy(self.resize.apply_image(image)).permute(2, 0, 1)
        normalised = (resized - self.pixel_mean) / self.pixel_std
        h, w = normalised.shape[-2:]
        padded = F.pad(normalised, (0, self.image_size - w, 0, self.image_size - h))
        return padded, (h, w)


def resize_image(image: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """(3, H, W) uint8 or float -> (3, h, w) float, bilinear with antialiasing; unchanged values when the size
    is the same. The OVSS models' resize of an image to their input (detectron2's, as CAT-Seg's pipeline does)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image.float()
    return F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def sam_input(images: torch.Tensor, sam_size: int, pixel_mean: torch.Tensor, pixel_std: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) RGB on 0..255 -> (B, 3, sam_size, sam_size) SAM's encoder input as the OVSS models give it:
    bilinear (antialiased) to SAM's side, then SAM's normalisation ((3, 1, 1) mean and std)."""
    size = (sam_size, sam_size)
    resized = F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    return (resized - pixel_mean) / pixel_std


class ModelInputTransform:
    """The OVSS cache's preprocessing: uint8 RGB (H, W, 3) -> ((3, sam_size, sam_size) SAM's encoder input,
    (sam_size, sam_size)), called as :class:`SAMImageTransform` (SSP-SAM's) is.

    Why not SAM's own transform (long side to SAM's, aspect kept, padded): the OVSS models never show SAM
    the image file, but their input, the image resized to ``model_input_size`` squared (training with
    ``crop=none``, evaluation without the sliding window), which ``SAMProposer.embed`` resizes to SAM's
    side by :func:`sam_input`. Cached entries computed this way are what the model computes itself, for any
    image size or aspect.
    """

    def __init__(self, model_input_size: int, sam_size: int) -> None:
        self.model_input_size = model_input_size
        self.sam_size = sam_size
        self.pixel_mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
        self.pixel_std = torch.tensor(PIXEL_STD).view(3, 1, 1)

    def __call__(self, image: np.ndarray) -> Tuple[torch.Tensor, Tuple[int, int]]:
        side = self.model_input_size
        square = resize_image(torch.from_numpy(image).permute(2, 0, 1), (side, side))
        return sam_input(square[None], self.sam_size, self.pixel_mean, self.pixel_std)[0], (self.sam_size, self.sam_size)


def upscale_to_padded_frame(low_res_logits: torch.Tensor, image_size: int) -> torch.Tensor:
    """SAM's low-resolution logits (B, M, s, s) -> the padded frame (B, M, S/2, S/2).

    As the release does it: bilinear (align_corners=False) to S x S, then bilinear to S/2 x S/2
    (256 -> 1024 -> 512 for S = 1024). The release also crops [:S, :S] in between, which is a
    no-op on an S x S map. The two steps are not the same as one direct resize; kept for parity.

    Both resizes are linear and separable, so their composition is one (S/2, s) matrix R applied to
    the rows and the columns, ``R @ logits @ R^T``: two matrix products instead of the S x S
    intermediate and its backward (several times faster; equal to float rounding, tested against
    ``F.interpolate``). R's entries are multiples of 1/16 for S = 4 s, exact in bf16 too.
    """
    low_res = low_res_logits.shape[-1]
    if low_res_logits.shape[-2] != low_res:
        raise ValueError(f"low_res_logits: expected square maps, got {tuple(low_res_logits.shape)}")
    resize = _two_step_resize_matrix(low_res, image_size, low_res_logits.device).to(low_res_logits.dtype)
    return resize @ low_res_logits @ resize.T


@lru_cache(maxsize=8)
def _two_step_resize_matrix(low_res: int, image_size: int, device: torch.device) -> torch.Tensor:
    """The (S/2, s) matrix of :func:`upscale_to_padded_frame`'s two bilinear resizes along one axis,
    made by ``F.interpolate`` itself (resizing the identity along that axis only), in float64.
    Remembered, so made outside inference mode: a first call under ``torch.inference_mode`` must not
    hand later training calls a tensor autograd cannot save."""
    with torch.inference_mode(False):
        identity = torch.eye(low_res, dtype=torch.float64)[None, None]
        full = F.interpolate(identity, (image_size, low_res), mode="bilinear", align_corners=False)
        half = F.interpolate(full, (image_size // 2, low_res), mode="bilinear", align_corners=False)
        return half[0, 0].to(device=device, dtype=torch.float32)


def valid_region(frame: torch.Tensor, input_size: Tuple[int, int]) -> torch.Tensor:
    """The image's part (..., ceil(h/2), ceil(w/2)) of a half-resolution padded frame (..., S/2, S/2).

    The resized image occupies rows [:h] and columns [:w] of the S x S input, so rows
    [:ceil(h/2)] and columns [:ceil(w/2)] of the half-resolution frame (the last kept row or
    column is half padding when h or w is odd).
    """
    return frame[..., : math.ceil(input_size[0] / 2), : math.ceil(input_size[1] / 2)]


def padded_frame_to_original(
    logits: torch.Tensor,
    input_size: Tuple[int, int],
    original_size: Tuple[int, int],
    image_size: int,
    mask_target: str = "release",
) -> torch.Tensor:
    """Padded-frame logits (B, 1, S/2, S/2) -> logits on the original image (B, 1, H, W).

    The image's region of the frame (:func:`valid_region`) is resampled bilinearly to H x W, placing
    each frame pixel where the training target of the model put it (``mask_target``) in the resized
    (h, w) image, which spans exactly the original image:

    - "release" and "area": frame pixel i at resized-image coordinate 2i + 1, between the two pixels
      it halves (where the area target's 2 x 2 block is centred): for even h and w this is the
      release's bilinear ``F.interpolate`` (align_corners=False) of the region to H x W. For odd h
      the region's last row is half padding, and resizing the whole region to H rows would stretch
      h + 1 resized pixels over the image (a mask shrunk by h / (h + 1) towards the top left; about
      half of COCO's images have an odd h at 1024); reading positions instead keeps it in place.
    - "nearest": :func:`mask_to_padded_frame` took frame pixel i from resized-image pixel 2i + 1,
      centred at 2i + 1.5: half a resized pixel further on in x and y. A model trained on it draws
      its masks there, so they are read back from there; the release's mapping would shift them by
      half a pixel up and left, which on ShapeWorld's 128-pixel frames costs about two points of mIoU.
    """
    half = image_size // 2
    if logits.shape[-2:] != (half, half):
        raise ValueError(f"logits: expected a padded frame {half}x{half}, got {tuple(logits.shape)}")
    if mask_target not in MASK_TARGET_CENTRES:
        raise ValueError(f"mask_target: expected one of {', '.join(MASK_TARGETS)}, got {mask_target!r}")
    centre = MASK_TARGET_CENTRES[mask_target]
    region = valid_region(logits, input_size)
    rows = _frame_resampling(original_size[0], input_size[0], region.shape[-2], centre, logits.device)
    columns = _frame_resampling(original_size[1], input_size[1], region.shape[-1], centre, logits.device)
    return rows.to(logits.dtype) @ region @ columns.to(logits.dtype).T


@lru_cache(maxsize=16)
def _frame_resampling(original: int, resized: int, frame: int, centre: float, device: torch.device) -> torch.Tensor:
    """The (original, frame) matrix that reads a padded frame back along one axis.

    Frame pixel i lies at resized coordinate 2i + ``centre``, i.e. original coordinate
    (2i + centre) * original / resized. Original pixel k (centre k + 0.5) therefore reads frame
    position s = ((k + 0.5) * resized / original - centre) / 2, linearly between its two
    neighbouring frame pixels and clamped to the frame's first and last pixel, as bilinear
    ``F.interpolate`` clamps (with centre 1 and an even ``resized`` this is ``F.interpolate`` of the
    ``resized / 2`` frame pixels to ``original``). Made outside inference mode, as
    :func:`_two_step_resize_matrix`.
    """
    with torch.inference_mode(False):
        position = ((torch.arange(original, dtype=torch.float64) + 0.5) * resized / original - centre) / 2
        position = position.clamp(0, frame - 1)
        below = position.floor().long().clamp(max=frame - 1)
        above = (below + 1).clamp(max=frame - 1)
        weight_above = position - below
        matrix = torch.zeros(original, frame, dtype=torch.float64)
        rows = torch.arange(original)
        matrix[rows, below] += 1 - weight_above
        matrix[rows, above] += weight_above
        return matrix.to(device=device, dtype=torch.float32)


def release_gt_frame(mask: np.ndarray, image_size: int) -> np.ndarray:
    """A GT mask (H, W) -> bool (S/2, S/2) as the release builds it for evaluation and training.

    The release (datasets/transforms.py SAMMaskResize, then datasets/dataset.py) turns the 0/1 mask
    into a float32 PIL image (mode "F": torchvision 0.16's ``to_pil_image`` keeps float32 arrays
    unscaled), resizes it to ResizeLongestSide's (h, w) with PIL's bilinear filter and keeps every
    pixel > 0 (so the edges grow by up to the filter's reach), pads it with zeros to S x S
    (bottom and right), and resizes that to S/2 x S/2 with torch's legacy "nearest" (source pixel
    floor(2 i): the even rows and columns).
    """
    height, width = ResizeLongestSide.get_preprocess_shape(mask.shape[0], mask.shape[1], image_size)
    image = Image.fromarray(np.asarray(mask, dtype=bool).astype(np.float32))  # float32 -> mode "F"
    resized = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR)) > 0
    padded = np.zeros((image_size, image_size), dtype=bool)
    padded[:height, :width] = resized
    return padded[::2, ::2]


def mask_to_padded_frame(mask: np.ndarray, image_size: int) -> torch.Tensor:
    """Ground-truth mask (H, W) -> 0/1 float (S/2, S/2) in the frame of :func:`upscale_to_padded_frame`.

    The mask is resized to the image's input size (ResizeLongestSide's shape) by nearest
    neighbour with pixel-centre sampling ("nearest-exact", no half-pixel shift, unlike "nearest"),
    padded with zeros to S x S, and downsampled by 2 with the same rule (which keeps the odd
    rows and columns: output pixel i samples input pixel 2i + 1). That sample lies half an input
    pixel past the point the release's mapping back assigns to frame pixel i, so the logits of a
    model trained on this target go back with ``padded_frame_to_original(..., mask_target="nearest")``.
    """
    if not isinstance(mask, np.ndarray) or mask.ndim != 2:
        found = mask.shape if isinstance(mask, np.ndarray) else type(mask).__name__
        raise ValueError(f"mask: expected a 2-D array (H, W), got {found}")
    h, w = ResizeLongestSide.get_preprocess_shape(mask.shape[0], mask.shape[1], image_size)
    mask_tensor = torch.from_numpy(mask.astype(bool)).float()[None, None]
    resized = F.interpolate(mask_tensor, (h, w), mode="nearest-exact")
    padded = F.pad(resized, (0, image_size - w, 0, image_size - h))
    half = image_size // 2
    return F.interpolate(padded, (half, half), mode="nearest-exact")[0, 0]


def mask_to_area_frame(mask: np.ndarray, image_size: int) -> torch.Tensor:
    """Ground-truth mask (H, W) -> float (S/2, S/2) in [0, 1]: the fraction of each frame pixel it covers.

    The mask is resized to the image's input size (ResizeLongestSide's shape) as a coverage map
    (``F.interpolate``'s "area" mode: each new pixel the mean of the old pixels its footprint falls
    on, a repeat when enlarging by a whole factor; the identity when the sizes agree), padded with zeros to
    S x S and averaged over 2 x 2 blocks, so frame pixel i is centred at input coordinate 2i + 1,
    where the release's mapping back (:func:`padded_frame_to_original`) puts it. Unlike a binary
    sample it keeps where an edge lies within a frame pixel: a model answering with the logit of this
    coverage gives back the mask itself at the input's resolution (a disc of radius 12 at 256: IoU
    1.0, against 0.94 from :func:`mask_to_padded_frame`'s binary sample).
    """
    if not isinstance(mask, np.ndarray) or mask.ndim != 2:
        found = mask.shape if isinstance(mask, np.ndarray) else type(mask).__name__
        raise ValueError(f"mask: expected a 2-D array (H, W), got {found}")
    h, w = ResizeLongestSide.get_preprocess_shape(mask.shape[0], mask.shape[1], image_size)
    coverage = torch.from_numpy(mask.astype(bool)).float()[None, None]
    if (h, w) != mask.shape:
        coverage = F.interpolate(coverage, (h, w), mode="area")
    padded = F.pad(coverage, (0, image_size - w, 0, image_size - h))
    return F.avg_pool2d(padded, 2)[0, 0]


def release_mask_target(mask: np.ndarray, image_size: int) -> torch.Tensor:
    """The release's training target: :func:`release_gt_frame` as 0/1 float (S/2, S/2)."""
    return torch.from_numpy(release_gt_frame(mask, image_size)).float()


# model.mask_target: how a training target puts a GT mask (H, W) bool into the padded frame as the
# (S/2, S/2) float target of the mask losses, which fixes where the frame pixels of a model trained on
# it lie in the image, and so how its logits go back to the image (:func:`padded_frame_to_original`):
# "release" (the release's processing), "nearest" (frame pixel i = resized-image pixel 2i + 1), "area"
# (frame pixel i = the fraction of resized pixels 2i and 2i + 1 covered).
MASK_TARGET_BUILDERS = {"release": release_mask_target, "nearest": mask_to_padded_frame, "area": mask_to_area_frame}
MASK_TARGETS = tuple(MASK_TARGET_BUILDERS)
# Where each target puts frame pixel i in the resized image: at coordinate 2i + centre.
MASK_TARGET_CENTRES = {"release": 1.0, "nearest": 1.5, "area": 1.0}
