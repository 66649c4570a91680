"""CAT-Seg: CLIP cost volume -> cost embedding -> N x (spatial, class aggregation) -> guided upsampling.

Facts from KU-CVLAB/CAT-Seg (``cat_seg_model.py``, ``modeling/transformer/model.py``): the image is
resized to CLIP's resolution (bilinear), the ViT's intermediate outputs are upsampled by transposed
convolutions (x2 to 256 channels, x4 to 128) and projected (3x3 conv + ReLU) to guide the two decoder
blocks; the final dense features, projected the same way, guide spatial aggregation; the class
embeddings averaged over the prompt templates, re-normalised and projected (linear + ReLU) guide class
aggregation. The logits come out at a quarter of the input resolution, one map per class.

The forward pass is split in two (:meth:`CATSeg.costs`, :meth:`CATSeg.decode`) so SAM-MI can read the
costs before aggregation and inject mask context into it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import Tensor, nn

from ...backbones.clip_tokenizer import CLIPTokenizer
from ...errors import ImageError
from ..model_config import OVSSModelConfig
from ..prompts import class_prompts, load_templates
from .aggregation import AggregationLayer
from .clip_dense import CATSegCLIP
from .cost import CostEmbedding, cost_volume, gather_classes, scatter_classes, select_classes
from .decoder import UpsamplingDecoder


@dataclass
class CostState:
    """Everything :meth:`CATSeg.decode` needs, computed once per batch by :meth:`CATSeg.costs`.

    K is the number of aggregated classes (T, or ``max_classes`` when there are more).
    """

    dense: Tensor  # (B, E, g, g) dense CLIP features (not normalised)
    cost: Tensor  # (B, P, T, g, g) cosine similarities of every class
    selected: Tensor | None  # (B, K) aggregated class indices, None when all T are
    embedding: Tensor  # (B, C, K, g, g) cost embedding
    appearance: Tensor  # (B, A, g, g) spatial-aggregation guidance
    text_guidance: Tensor  # (B, K, G) class-aggregation guidance
    decoder_guidance: list[Tensor]  # (B, G_i, 2^(i+1) g, 2^(i+1) g) for the two decoder blocks

    @property
    def num_classes(self) -> int:
        return self.cost.shape[2]


def projection(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 conv + ReLU, CAT-Seg's guidance projection."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1), nn.ReLU())


class CATSeg(nn.Module):
    """CAT-Seg on a :class:`CATSegCLIP`.

    Args:
        clip: the CLIP (trainable parameters already chosen).
        config: sizes (``config.aggregator``), templates and input size.
        decoder_extra_channels: per-class extra maps into each decoder block (SAM-MI's high-frequency
            injection; 0 for CAT-Seg).
    """

    def __init__(self, clip: CATSegCLIP, config: OVSSModelConfig, decoder_extra_channels: int = 0) -> None:
        super().__init__()
        agg = config.aggregator
        self.clip = clip
        self.image_size = config.image_size
        self.max_classes = agg.max_classes
        self.low_score = agg.low_score
        self.templates = load_templates(config.clip.templates)
        self.tokenizer = CLIPTokenizer(context_length=clip.clip.context_length, append_period=False)
        self.register_buffer("clip_mean", torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("clip_std", torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1) * 255, persistent=False)

        embed, width = clip.embed_dim, clip.vision_width
        self.cost_embedding = CostEmbedding(len(self.templates), agg.hidden_dim)
        self.appearance_projection = projection(embed, agg.appearance_guidance_dim)
        self.text_projection = nn.Sequential(nn.Linear(embed, agg.text_guidance_dim), nn.ReLU())
        self.guidance_upsampling = nn.ModuleList([
            nn.ConvTranspose2d(width, agg.decoder_guidance_dims[0], kernel_size=2, stride=2),
            nn.ConvTranspose2d(width, agg.decoder_guidance_dims[1], kernel_size=4, stride=4),
        ])
        self.decoder_guidance_projection = nn.ModuleList([
            projection(dim, proj) for dim, proj in zip(agg.decoder_guidance_dims, agg.decoder_guidance_proj_dims)
        ])
        self.layers = nn.ModuleList([
            AggregationLayer(
                agg.hidden_dim,
                agg.appearance_guidance_dim,
                agg.text_guidance_dim,
                clip.grid_size,
                agg.num_heads,
                agg.window_size,
                tuple(agg.pooling),
                agg.max_classes if agg.pad_classes else 0,
                None if agg.test_pooling is None else tuple(agg.test_pooling),
            )
            for _ in range(agg.num_layers)
        ])
        self.decoder = UpsamplingDecoder(agg.hidden_dim, agg.decoder_dims, agg.decoder_guidance_proj_dims, decoder_extra_channels)

    def encode_classes(self, class_names: Sequence[str]) -> Tensor:
        """(T, P, E) L2-normalised class embeddings, one per template (with autograd when CLIP's text is trained)."""
        tokens = self.tokenizer(class_prompts(class_names, self.templates)).to(self.clip_mean.device)
        return self.clip.encode_text(tokens).view(len(class_names), len(self.templates), -1)

    def clip_pixels(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) RGB on 0..255 -> CLIP's normalised (B, 3, R, R) (bilinear, as CAT-Seg)."""
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, self.image_size, self.image_size):
            raise ImageError(f"images must have shape (B, 3, {self.image_size}, {self.image_size}), got {tuple(images.shape)}")
        normalised = (images - self.clip_mean) / self.clip_std
        size = (self.clip.resolution, self.clip.resolution)
        return F.interpolate(normalised, size=size, mode="bilinear", align_corners=False)

    def costs(self, images: Tensor, text: Tensor) -> CostState:
        """CLIP features, cost volume, class selection, cost embedding and the guidance maps.

        Args:
            images: (B, 3, S, S) RGB on 0..255, S = ``image_size``.
            text: (T, P, E) from :meth:`encode_classes`.
        """
        dense, intermediate = self.clip.encode_image(self.clip_pixels(images))
        cost = cost_volume(dense, text)
        selected = select_classes(cost, self.max_classes)
        kept_cost = gather_classes(cost, selected, dim=2)
        class_text = F.normalize(text.mean(dim=1), dim=-1).expand(images.shape[0], -1, -1)
        decoder_guidance = [
            project(upsample(features))
            for upsample, project, features in zip(self.guidance_upsampling, self.decoder_guidance_projection, intermediate)
        ]
        return CostState(
            dense=dense,
            cost=cost,
            selected=selected,
            embedding=self.cost_embedding(kept_cost),
            appearance=self.appearance_projection(dense),
            text_guidance=self.text_projection(gather_classes(class_text, selected, dim=1)),
            decoder_guidance=decoder_guidance,
        )

    def decode(
        self,
        state: CostState,
        before_layer: Callable[[int, Tensor], Tensor] | None = None,
        decoder_extras: Sequence[Tensor] | None = None,
    ) -> Tensor:
        """Aggregation and upsampling.

        Args:
            before_layer: ``f(i, embedding) -> embedding`` run before aggregation layer i (SAM-MI's
                low-frequency injection), on the (B, C, K, g, g) embedding.
            decoder_extras: per decoder block, (B, K, E, h_i, w_i) extra maps (high-frequency injection).

        Returns:
            (B, T, 4g, 4g) logits; classes not aggregated are at ``low_score``.
        """
        x = state.embedding
        for index, layer in enumerate(self.layers):
            if before_layer is not None:
                x = before_layer(index, x)
            x = layer(x, state.appearance, state.text_guidance)
        logits = self.decoder(x, state.decoder_guidance, decoder_extras)
        return scatter_classes(logits, state.selected, state.num_classes, self.low_score)

    def forward(self, images: Tensor, text: Tensor) -> Tensor:
        """(B, 3, S, S) images on 0..255 and (T, P, E) class embeddings -> (B, T, S/4', S/4') logits."""
        return self.decode(self.costs(images, text))
