"""CAT-Seg's sliding-window inference (``CATSeg.inference_sliding_window``) as a model-agnostic function.

The image is resized (bilinear, aspect ratio not kept) to ``out_size``, cut into ``window`` x ``window``
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

from ..errors import ImageError


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
    stride = int(window * (1 - overlap))
    unfold = nn.Unfold(kernel_size=window, stride=stride)
    fold = nn.Fold((out_size, out_size), kernel_size=window, stride=stride)

    resized = F.interpolate(image[None].float(), size=(out_size, out_size), mode="bilinear", align_corners=False)
    crops = unfold(resized)[0].T.reshape(-1, 3, window, window)
    global_view = F.interpolate(image[None].float(), size=(window, window), mode="bilinear", align_corners=False)
    probabilities = predict(torch.cat([crops, global_view], dim=0))

    tiles = probabilities[:-1].flatten(1).T  # (T * window^2, crops): fold's unbatched layout
    coverage = fold(unfold(torch.ones(1, out_size, out_size, device=image.device)))  # crops covering each pixel
    tiled = fold(tiles) / coverage
    global_probabilities = F.interpolate(probabilities[-1:], size=(out_size, out_size), mode="bilinear", align_corners=False)[0]
    averaged = (tiled + global_probabilities) / 2
    return F.interpolate(averaged[None], size=tuple(image.shape[-2:]), mode="bilinear", align_corners=False)[0]
