"""The OVSS models' common interface, and CAT-Seg alone behind it.

A training loop calls::

    text = model.encode_classes(class_names)          # (T, P, E), with autograd when CLIP's text is trained
    output = model(images, text)                      # images (B, 3, S, S) RGB on 0..255
    losses = model.loss(output, labels)               # labels (B, S, S) class ids, 255 ignored; losses["loss"]

and inference ``model.predict(images, text)`` -> (B, T, S, S) per-class probabilities (the function
:func:`ssp_sam.ovss.sliding_window.sliding_window_inference` takes as ``predict``). Every variant takes
``sam_embeddings`` (B, C, h, w) from a cache in place of running SAM's image encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .catseg.model import CATSeg
from .losses import per_class_bce
from .model_config import OVSSModelConfig
from .sam_mi.proposals import Proposals
from .sam_mi.tspp import TSPPLogits


@dataclass
class OVSSOutput:
    logits: Tensor  # (B, T, S/4, S/4) per-class logits (what the loss trains)
    selected: Tensor | None = None  # (B, K) aggregated classes when T > max_classes
    tspp: TSPPLogits | None = None  # SAM-MI with TSPP: point-map logits of the K aggregated classes
    proposals: Proposals | None = None  # the SAM masks used (variants with SAM, when run)


class OVSSModel(nn.Module):
    """CAT-Seg alone (``variant=catseg``); the base of the SAM variants."""

    def __init__(self, catseg: CATSeg, config: OVSSModelConfig) -> None:
        super().__init__()
        self.catseg = catseg
        self.config = config

    @property
    def image_size(self) -> int:
        return self.catseg.image_size

    def encode_classes(self, class_names: Sequence[str]) -> Tensor:
        return self.catseg.encode_classes(class_names)

    def forward(self, images: Tensor, text: Tensor, sam_embeddings: Tensor | None = None) -> OVSSOutput:
        """``sam_embeddings`` is accepted (and unused) so every variant has the same call."""
        state = self.catseg.costs(images, text)
        return OVSSOutput(logits=self.catseg.decode(state), selected=state.selected)

    def loss(self, output: OVSSOutput, labels: Tensor, ignore_index: int = 255) -> dict[str, Tensor]:
        """{"loss": the total to minimise, "seg": CAT-Seg's per-class BCE}."""
        seg = per_class_bce(output.logits, labels, ignore_index, self.config.aggregator.ignore_pixels)
        return {"loss": seg, "seg": seg}

    def probabilities(self, output: OVSSOutput) -> Tensor:
        """(B, T, S, S): the logits upsampled (bilinear) to the input, then sigmoid (as CAT-Seg's inference)."""
        size = (self.image_size, self.image_size)
        return torch.sigmoid(F.interpolate(output.logits.float(), size=size, mode="bilinear", align_corners=False))

    def predict(self, images: Tensor, text: Tensor, sam_embeddings: Tensor | None = None) -> Tensor:
        """(B, T, S, S) per-class probabilities."""
        return self.probabilities(self(images, text, sam_embeddings))
