"""Fill the SAM embedding cache for a set of images before training or evaluation reads it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from ..backbones.sam import SAMImageTransform
from ..data.embedding_cache import EmbeddingCache, build_cache, image_key, sam_encoder_fingerprint
from .distributed import DistInfo, barrier


def ensure_cache(
    root: str | os.PathLike,
    image_paths: Iterable[Path],
    image_encoder: nn.Module | Callable[[], nn.Module],
    sam_checkpoint: Optional[str],
    image_size: int,
    device: torch.device,
    dist_info: DistInfo = DistInfo(),
    batch_size: int = 4,
    dtype: str = "auto",
    progress: bool = True,
) -> EmbeddingCache:
    """Compute the embeddings the cache lacks (rank 0 only; the others wait) and open the cache.

    The cache folder is keyed by the SAM weights: the hash of ``sam_checkpoint`` when the encoder
    came from that file, else the hash of the encoder's own weights. ``image_encoder`` may be a
    function that builds the encoder: with ``sam_checkpoint`` given it is called only if some image
    lacks its embedding, so evaluating or training from a complete cache never holds SAM's image
    encoder (2.5 GB of weights for ViT-H) in memory.
    """
    if sam_checkpoint is None and not isinstance(image_encoder, nn.Module):
        image_encoder = image_encoder()  # its weights are the fingerprint
    fingerprint = sam_encoder_fingerprint(image_encoder, sam_checkpoint)
    if dist_info.is_main:
        images = {image_key(path): path for path in image_paths}
        build_cache(
            root, images, image_encoder, SAMImageTransform(image_size), fingerprint,
            batch_size=batch_size, device=device, dtype=dtype, progress=progress,
        )
    barrier(dist_info)
    return EmbeddingCache(root, fingerprint)
