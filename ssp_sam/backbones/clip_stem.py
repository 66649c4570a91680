"""A convolutional stem for the custom CLIP's vision tower (optional ``stem: conv`` of ``clip_custom``).

open_clip's ViT turns the image into tokens with one ``patch_size`` x ``patch_size`` convolution of
stride ``patch_size`` ("patchify"). Xiao et al., "Early Convolutions Help Transformers See Better"
(NeurIPS 2021), replace it by a few 3x3 stride-2 convolutions with normalisation and ReLU, ending in a
1x1 convolution to the width, and report faster, more stable optimisation. Here it is what lets a
ViT trained from scratch on ShapeWorld see shape: inside a patch, a corner or a curve is a local
pattern that 3x3 filters pick up in a few steps, while the patchify projection must learn it as one
linear map per whole patch (docs/pretraining.md, "Shape").

The stem keeps the patchify convolution's contract, so it replaces ``visual.conv1`` and nothing else
changes: (B, 3, S, S) -> (B, width, S / patch_size, S / patch_size), and it exposes ``weight`` (the
dtype and device the image is cast to) and ``out_channels`` as ``nn.Conv2d`` does.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from ..errors import ConfigError

# Channel groups of each GroupNorm. GroupNorm, not the paper's BatchNorm: SSP-SAM runs CLIP frozen in
# eval mode, and CLIPSurgeryBackbone keeps it there even in pretraining, so BatchNorm would never use
# (or gather) batch statistics; GroupNorm computes the same thing in training and inference.
NORM_GROUPS = 4


class ConvStem(nn.Module):
    """log2(patch_size) 3x3 stride-2 convolutions (each GroupNorm + ReLU), then a 1x1 convolution to ``width``.

    The channels double at each stride-2 convolution and reach ``width`` at the last one (width / 8,
    width / 4, width / 2, width for 16 px patches), as in Xiao et al.'s stems.
    """

    def __init__(self, width: int, patch_size: int) -> None:
        super().__init__()
        halvings = int(math.log2(patch_size)) if patch_size >= 2 else 0
        if 2**halvings != patch_size:
            raise ConfigError(f"custom CLIP config: stem 'conv' needs a power-of-two patch_size >= 2, got {patch_size}")
        channels = [3, *(width // 2 ** (halvings - 1 - index) for index in range(halvings))]
        if any(count % NORM_GROUPS for count in channels[1:]):
            raise ConfigError(
                f"custom CLIP config: stem 'conv' needs vision_width / {2 ** (halvings - 1)} to be a multiple "
                f"of {NORM_GROUPS}, got vision_width {width}"
            )
        layers: list[nn.Module] = []
        for inputs, outputs in zip(channels[:-1], channels[1:]):
            layers += [
                nn.Conv2d(inputs, outputs, kernel_size=3, stride=2, padding=1, bias=False),
                nn.GroupNorm(NORM_GROUPS, outputs),
                nn.ReLU(inplace=True),
            ]
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv2d(width, width, kernel_size=1)

    @property
    def weight(self) -> Tensor:
        """The projection's weight: its dtype and device are the stem's (as ``nn.Conv2d.weight`` is read)."""
        return self.proj.weight

    @property
    def out_channels(self) -> int:
        return self.proj.out_channels

    def forward(self, pixels: Tensor) -> Tensor:
        """(B, 3, S, S) -> (B, width, S / patch_size, S / patch_size)."""
        return self.proj(self.convs(pixels))
