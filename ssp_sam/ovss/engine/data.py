"""Items of an OVSS dataset for training (crops, keyed by epoch) and evaluation (whole images), and batch order.

Training (:class:`TrainingCrops`) follows CAT-Seg's ``MaskFormerSemanticDatasetMapper`` with its COCO-Stuff
settings (``crop=random``): the short side resized to ``short_side`` (the long side at most ``max_size``;
detectron2's ``ResizeShortestEdge``), a random ``image_size`` square (``RandomCrop`` "absolute"; the
category-area constraint is off in CAT-Seg's configs, single_category_max_area 1.0), a horizontal flip
with probability 1/2, and padding to the square (image 0, label ignored) where the image is smaller.
Images are resized bilinearly with antialiasing (as PIL's resize, which detectron2 calls), label maps
by nearest neighbour. CAT-Seg's colour jitter (``COLOR_AUG_SSD``) is not reproduced. ``crop=none``
resizes the whole image to the square instead and draws nothing at random.

Every random choice comes from a generator seeded by (seed, epoch, index), so an item is a pure
function of its key: a resumed run and any number of processes see the same crops as one
uninterrupted process. :class:`IterationBatchSampler` gives iteration i's global batch from one
permutation per (seed, epoch), as the SSP-SAM trainer's ``EpochBatchSampler`` (which it uses), and
can start at any iteration.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ...data.embedding_cache import EmbeddingCache
from ...data.training import EpochBatchSampler
from ..data.dataset import IGNORE_INDEX, SemSegDataset
from ..resize import resize_image, resize_label, shortest_edge_size


@dataclass
class TrainingCrops(torch.utils.data.Dataset):
    """Training items keyed by ``(epoch, index)``: ``{"image": float (3, S, S) on 0..255, "label": int64 (S, S),
    ["sam_embedding": (C, h, w)]}``, the label's ignored pixels at -1."""

    dataset: SemSegDataset  # the split
    image_size: int  # S, the model's input side
    crop: str  # "random" (CAT-Seg's crops, see the module docstring) or "none" (whole image resized)
    short_side: int  # the random crop's settings
    max_size: int
    flip: bool
    seed: int  # the run's seed
    # SAM embeddings of the model's input (only with crop="none"): an OVSS cache (ensure_cache's
    # model_input_size = image_size), whose entries embed the image resized to the square as below
    cache: EmbeddingCache | None = None

    def __post_init__(self) -> None:
        if self.cache is not None and self.crop != "none":
            raise ValueError("cached SAM embeddings are of whole images: they need crop='none'")
        check_model_input_cache(self.cache, self.image_size)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Tensor]:
        epoch, index = key
        item = self.dataset[index]
        image, label = item["image"], item["label"]
        size = self.image_size
        if self.crop == "none":
            out = {"image": resize_image(image, (size, size)), "label": resize_label(label, (size, size))}
        else:
            out = self._random_crop(image, label, np.random.default_rng([self.seed, epoch, index]))
        if self.cache is not None:
            out["sam_embedding"] = self.cache.get(self.dataset.samples[index].image_path)
        return out

    def _random_crop(self, image: Tensor, label: Tensor, rng: np.random.Generator) -> dict[str, Tensor]:
        height, width = shortest_edge_size(image.shape[1], image.shape[2], self.short_side, self.max_size)
        image, label = resize_image(image, (height, width)), resize_label(label, (height, width))
        crop_h, crop_w = min(self.image_size, height), min(self.image_size, width)
        top = int(rng.integers(0, height - crop_h + 1))
        left = int(rng.integers(0, width - crop_w + 1))
        image, label = image[:, top : top + crop_h, left : left + crop_w], label[top : top + crop_h, left : left + crop_w]
        if self.flip and rng.random() < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        pad = (0, self.image_size - crop_w, 0, self.image_size - crop_h)
        # CAT-Seg's mapper pads the image with 128 (and the label with the ignore value) up to the crop
        return {"image": F.pad(image, pad, value=128.0), "label": F.pad(label, pad, value=IGNORE_INDEX)}


class IterationBatchSampler(torch.utils.data.Sampler[list[tuple[int, int]]]):
    """The ``(epoch, index)`` keys of this rank's share of iterations ``start .. iterations - 1``.

    Iteration i is batch ``i % steps_per_epoch`` of epoch ``i // steps_per_epoch`` of an
    :class:`EpochBatchSampler` (one permutation per (seed, epoch), incomplete last batch dropped).
    """

    def __init__(self, size: int, global_batch: int, seed: int, iterations: int, start: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.epochs = EpochBatchSampler(size, global_batch, seed, rank, world_size)
        self.steps_per_epoch = len(self.epochs)
        if self.steps_per_epoch == 0:
            raise ValueError(f"batch size {global_batch} is larger than the {size} training images")
        self.iterations = iterations
        self.start = start

    def __len__(self) -> int:
        return max(self.iterations - self.start, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        iteration = self.start
        while iteration < self.iterations:
            epoch, skip = divmod(iteration, self.steps_per_epoch)
            self.epochs.set_epoch(epoch)
            for batch in islice(iter(self.epochs), skip, skip + self.iterations - iteration):
                yield batch
                iteration += 1


class EvaluationImages(torch.utils.data.Dataset):
    """Whole images for evaluation: ``{"image": uint8 (3, H, W), "label": int64 (H, W), "index", ["sam_embedding"]}``."""

    def __init__(self, dataset: SemSegDataset, indices: list[int], cache: EmbeddingCache | None = None) -> None:
        self.dataset = dataset
        self.indices = indices
        self.cache = cache

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict[str, Any]:
        item = self.dataset[self.indices[position]]
        if self.cache is not None:
            item["sam_embedding"] = self.cache.get(self.dataset.samples[item["index"]].image_path)
        return item


def check_model_input_cache(cache: EmbeddingCache | None, image_size: int) -> None:
    """Refuse a cache whose entries are not SAM's embeddings of this model's input (an SSP-SAM cache, or one
    for another input size): the model would be given embeddings it does not compute itself."""
    if cache is not None and cache.encoder.model_input_size != image_size:
        raise ValueError(
            f"{cache.folder}: SAM embeddings of model input {cache.encoder.model_input_size}, but the model's input is "
            f"{image_size} (open the cache with ensure_cache(..., model_input_size={image_size}))"
        )


def as_list(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Evaluation batches stay lists: the images differ in size."""
    return items
