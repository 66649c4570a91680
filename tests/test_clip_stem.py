"""The custom CLIP's optional convolutional stem (ssp_sam/backbones/clip_stem.py, ``clip_custom.stem``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ssp_sam.backbones.clip import CLIPSurgeryBackbone, build_clip_model
from ssp_sam.backbones.clip_stem import ConvStem
from ssp_sam.errors import CheckpointError, ConfigError

TINY = {
    "embed_dim": 16, "image_size": 32, "patch_size": 8, "vision_width": 32, "vision_layers": 2,
    "vision_head_width": 16, "text_width": 16, "text_layers": 1, "text_heads": 2, "context_length": 77,
}


def test_stem_halves_the_side_per_convolution_and_doubles_the_channels_up_to_the_width():
    """16 px patches: four 3x3 stride-2 convolutions with width / 8, / 4, / 2, / 1 channels (Xiao et al.'s
    layout), then a 1x1 convolution; the output is the patchify convolution's token grid."""
    stem = ConvStem(width=160, patch_size=16)
    convs = [module for module in stem.convs if isinstance(module, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (3, 20, (3, 3), (2, 2)), (20, 40, (3, 3), (2, 2)), (40, 80, (3, 3), (2, 2)), (80, 160, (3, 3), (2, 2)),
    ]
    assert (stem.proj.kernel_size, stem.proj.in_channels, stem.out_channels) == ((1, 1), 160, 160)
    assert stem(torch.zeros(2, 3, 256, 256)).shape == (2, 160, 16, 16)
    assert ConvStem(width=32, patch_size=8)(torch.zeros(1, 3, 32, 32)).shape == (1, 32, 4, 4)
    assert stem.weight is stem.proj.weight  # what CLIPSurgeryBackbone reads the input dtype from


def test_conv_stem_model_saves_and_loads_through_the_clip_weight_reader(tmp_path):
    torch.manual_seed(0)
    model = build_clip_model("custom", custom={**TINY, "stem": "conv"})
    assert isinstance(model.visual.conv1, ConvStem)
    pixels = torch.randn(2, 3, 32, 32)
    tokens = CLIPSurgeryBackbone(model, surgery_blocks=1).encode_image(pixels)
    assert tokens.shape == (2, 1 + 16, 16)
    path = tmp_path / "clip.pt"
    torch.save(model.state_dict(), path)
    loaded = build_clip_model("custom", checkpoint=path, custom={**TINY, "stem": "conv"})
    assert torch.equal(CLIPSurgeryBackbone(loaded, surgery_blocks=1).encode_image(pixels), tokens)
    with pytest.raises(CheckpointError, match="missing keys: visual.conv1.weight"):
        build_clip_model("custom", checkpoint=path, custom=TINY)  # the default stem is open_clip's patchify


@pytest.mark.parametrize(
    "change, message",
    [
        ({"stem": "resnet"}, "custom CLIP config: stem must be one of patch, conv, got 'resnet'"),
        ({"stem": "conv", "image_size": 36, "patch_size": 12}, "custom CLIP config: stem 'conv' needs a power-of-two patch_size"),
        ({"stem": "conv", "vision_width": 48, "vision_head_width": 16, "patch_size": 16},
         "custom CLIP config: stem 'conv' needs vision_width / 8 to be a multiple of 4"),
    ],
)
def test_bad_stem_settings_are_named(change, message):
    with pytest.raises(ConfigError) as error:
        build_clip_model("custom", custom={**TINY, **change})
    assert str(error.value).startswith(message), str(error.value)
