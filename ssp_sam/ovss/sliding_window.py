"""CAT-Seg's sliding-window inference (``CATSeg.inference_sliding_window``) as a model-agnostic function.

The image first goes through detectron2's test-time resize as CAT-Seg configures it (short side to
``out_size``, 640, long side at most ``TEST_MAX_SIZE``; antialiased), is then resized (bilinear, aspect
ratio not kept) to ``out_size``, cut into ``window`` x ``window``
crops with stride ``int(window * (1 - overlap))`` (384 and 0.333 over 640: 2 x 2 crops at 0 and 256),
plus the whole image resized to one window (the global view). All crops go through the model in one
batch; the crops' probabilities are averaged where they overlap (fold / fold of ones), averaged 1:1 with
the global view's, and resized (bilinear) to the image's size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, ImageError
from .resize import resize_image, resize_probabilities, shortest_edge_size

TEST_MAX_SIZE = 2560  # detectron2's INPUT.MAX_SIZE_TEST in CAT-Seg's configs (MIN_SIZE_TEST is 640 = out_size)


def window_stride(window: int, overlap: float) -> int:
    """CAT-Seg's stride between crops: ``int(window * (1 - overlap))`` (256 for 384 at 0.333)."""
    return int(window * (1 - overlap))


def default_out_size(window: int, overlap: float) -> int:
    """The side the image is resized to when none is given: window + stride, two crops a side (CAT-Seg's 640 for
    384 at overlap 0.333), which the crops always cover, whatever the window."""
    return window + window_stride(window, overlap)


def check_sliding_window(window: int, overlap: float, out_size: int) -> None:
    """Raise ConfigError unless the crops cover the resized image exactly: out_size = window + k * stride.

    Otherwise the last rows and columns lie in no crop, their averaged probabilities are 0 / 0 (NaN) and
    the argmax there is meaningless (e.g. window 256 over 640: crops end at 596).
    """
    stride = window_stride(window, overlap)
    if not 0 <= overlap < 1 or stride < 1:
        raise ConfigError(f"eval.overlap={overlap}: must lie in [0, 1) and leave a stride of at least 1 pixel (window {window})")
    if out_size < window or (out_size - window) % stride:
        fitting = window + max(round((out_size - window) / stride), 1) * stride
        raise ConfigError(
            f"eval.out_size={out_size}: windows of {window} with stride {stride} do not cover it; "
            f"give window + a multiple of the stride, e.g. {fitting}"
        )


def sliding_window_inference(
    predict: Callable[[Tensor], Tensor],
    image: Tensor,
    window: int = 384,
    overlap: float = 0.333,
    out_size: int = 640,
) -> Tensor:
    """Per-class probabilities of one image.

    Args:
        predict: (N, 3, window, window) crops -> (N, T, window, window) probabilities.
        image: (3, H, W) float image (the scale ``predict`` expects).

    Returns:
        (T, H, W) probabilities.
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ImageError(f"sliding-window inference takes one (3, H, W) image, got {tuple(image.shape)}")
    check_sliding_window(window, overlap, out_size)
    stride = window_stride(window, overlap)
    unfold = nn.Unfold(kernel_size=window, stride=stride)
    fold = nn.Fold((out_size, out_size), kernel_size=window, stride=stride)

    # detectron2's test mapper first (CAT-Seg's configs: short side MIN_SIZE_TEST = 640 = out_size, long side
    # at most MAX_SIZE_TEST), antialiased as its PIL resize is; then CAT-Seg's own resizes, without antialiasing.
    prepared = resize_image(image, shortest_edge_size(image.shape[1], image.shape[2], out_size, TEST_MAX_SIZE))[None]
    resized = F.interpolate(prepared, size=(out_size, out_size), mode="bilinear", align_corners=False)
    crops = unfold(resized)[0].T.reshape(-1, 3, window, window)
    global_view = F.interpolate(prepared, size=(window, window), mode="bilinear", align_corners=False)
    probabilities = predict(torch.cat([crops, global_view], dim=0))

    tiles = probabilities[:-1].flatten(1).T  # (T * window^2, crops): fold's unbatched layout
    coverage = fold(unfold(torch.ones(1, out_size, out_size, device=image.device)))  # crops covering each pixel
    tiled = fold(tiles) / coverage
    global_probabilities = F.interpolate(probabilities[-1:], size=(out_size, out_size), mode="bilinear", align_corners=False)[0]
    averaged = (tiled + global_probabilities) / 2
    return resize_probabilities(averaged, tuple(image.shape[-2:]))
