"""Zero-shot pixel accuracy of CAT-Seg's cost volume: how well the CLIP alone tells the classes apart.

Before any OVSS training, the class of a pixel is read off the cost volume (cosine of the dense CLIP
features and the class embeddings, averaged over the prompt templates): its argmax over the classes,
after the (T, g, g) costs are upsampled bilinearly to the label's size. Its accuracy over the labelled
pixels says whether the CLIP's dense path (``ovss_model.clip.dense``: CAT-Seg's last block or CLIP
Surgery's patch stream) and the prompts (``clip.templates``) carry the class names at all; chance is
1 / T. ``scripts/ovss_zeroshot.py`` scores a dataset split with it (docs/ovss_models.md: 1.1 % through
CAT-Seg's path against 20.2 % through CLIP Surgery's on ShapeWorld-OVSS with the ShapeWorld CLIP).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .catseg.cost import cost_volume
from .catseg.model import CATSeg
from .data.dataset import IGNORE_INDEX


def zero_shot_costs(catseg: CATSeg, images: Tensor, text: Tensor) -> Tensor:
    """(B, 3, S, S) RGB on 0..255 and (T, P, E) class embeddings -> (B, T, g, g) costs, the mean over the P templates."""
    dense, _ = catseg.clip.encode_image(catseg.clip_pixels(images))
    return cost_volume(dense, text).mean(dim=1)


def pixel_hits(costs: Tensor, label: Tensor) -> Tensor:
    """(T, g, g) costs of one image and its (H, W) label (``IGNORE_INDEX`` where unlabelled) -> (2,) int64 on the
    costs' device: pixels whose argmax class is the label's, labelled pixels."""
    upsampled = F.interpolate(costs[None].float(), size=tuple(label.shape), mode="bilinear", align_corners=False)[0]
    label = label.to(costs.device)
    labelled = label != IGNORE_INDEX
    return torch.stack([(upsampled.argmax(dim=0)[labelled] == label[labelled]).sum(), labelled.sum()])
