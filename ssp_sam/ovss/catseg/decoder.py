"""CAT-Seg's upsampling decoder: two x2 blocks (transposed conv, then a double conv over the upsampled
cost embedding concatenated with projected CLIP features), then a 1-channel head shared by all classes.

``extra_channels`` adds per-class input maps to each block's double conv (SAM-MI's high-frequency mask
injection); their input weights start at zero, so a fresh model computes exactly CAT-Seg's decoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DoubleConv(nn.Sequential):
    """(3x3 conv, GroupNorm of width/16 groups, ReLU) twice, convolutions without bias."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(out_channels // 16, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(out_channels // 16, out_channels),
            nn.ReLU(inplace=True),
        )


class UpBlock(nn.Module):
    """x2 upsampling of a per-class map guided by CLIP features.

    ``forward(x, guidance, extra)``: x (N, C_in, H, W) with N = B * T, guidance (B, G, 2H, 2W),
    extra None or (N, E, 2H, 2W) -> (N, C_out, 2H, 2W).
    """

    def __init__(self, in_channels: int, out_channels: int, guidance_channels: int, extra_channels: int = 0) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels - guidance_channels, kernel_size=2, stride=2)
        self.conv = DoubleConv(in_channels + extra_channels, out_channels)
        self.extra_channels = extra_channels
        if extra_channels:
            with torch.no_grad():
                self.conv[0].weight[:, in_channels:] = 0

    def forward(self, x: Tensor, guidance: Tensor, extra: Tensor | None = None) -> Tensor:
        x = self.up(x)
        images, classes = guidance.shape[0], x.shape[0] // guidance.shape[0]
        # The first conv of [x, guidance, extra] is the sum of its convs over each part's input channels.
        # The guidance is the same for every class of an image: convolved once per image and broadcast,
        # not repeated per class and concatenated (B*T copies; the same weights, results equal to rounding).
        weight = self.conv[0].weight
        x_channels, guidance_channels = x.shape[1], guidance.shape[1]
        y = F.conv2d(x, weight[:, :x_channels], padding=1)
        y = y.unflatten(0, (images, classes)) + F.conv2d(guidance, weight[:, x_channels : x_channels + guidance_channels], padding=1)[:, None]
        y = y.flatten(0, 1)
        if self.extra_channels:
            y = y + F.conv2d(extra, weight[:, x_channels + guidance_channels :], padding=1)
        for layer in list(self.conv)[1:]:  # the double conv after its first convolution
            y = layer(y)
        return y


class UpsamplingDecoder(nn.Module):
    """Two UpBlocks and the 1-channel head: (B, C, T, H, W) cost embedding -> (B, T, 4H, 4W) logits.

    Args:
        hidden_dim: C, the cost embedding width.
        dims: output widths of the two blocks.
        guidance_dims: widths of the (already projected) guidance maps of the two blocks.
        extra_channels: per-class extra input maps of each block (0: CAT-Seg).
    """

    def __init__(self, hidden_dim: int, dims: Sequence[int], guidance_dims: Sequence[int], extra_channels: int = 0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([
            UpBlock(hidden_dim, dims[0], guidance_dims[0], extra_channels),
            UpBlock(dims[0], dims[1], guidance_dims[1], extra_channels),
        ])
        self.head = nn.Conv2d(dims[1], 1, kernel_size=3, padding=1)

    def forward(self, x: Tensor, guidance: Sequence[Tensor], extras: Sequence[Tensor] | None = None) -> Tensor:
        """``extras[i]``: (B, T, E, H_i, W_i) at block i's output resolution, or None."""
        batch, channels, classes, height, width = x.shape
        y = x.transpose(1, 2).reshape(batch * classes, channels, height, width)
        for index, block in enumerate(self.blocks):
            extra = extras[index].flatten(0, 1) if extras is not None else None
            y = block(y, guidance[index], extra)
        return self.head(y).view(batch, classes, *y.shape[-2:])
