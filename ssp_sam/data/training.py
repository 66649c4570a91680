"""Training items: one sample per index, one random expression per visit, SAM embedding from the cache.

The expression is drawn uniformly, as in the release, unless ``expression_weights`` weights the
sentences by a per-sentence annotation (e.g. ShapeWorld's kind: {"L": 3.0} makes a location
sentence of a referent three times as likely as each of its other sentences). Which referents an
epoch visits is the sampler's business: every referent once, as in the release, or, with
``referent_weights`` (:func:`referent_weights`), a draw weighted by the same annotation, so that a
kind most referents lack (ShapeWorld's L: 21 % of the referents) can be visited more often.

Each item is deterministic given (seed, epoch, index): the expression choice and the random
letterbox placement (the recipe's only augmentation) come from a generator seeded by those three
numbers, so a resumed run and a multi-process run see exactly the same items as a single run. The
epoch travels with the index (``items[epoch, index]``, as :class:`EpochBatchSampler` yields them),
so data-loader workers that persist across epochs need no message from the trainer.
Workers only read files: the SAM image embedding comes from :class:`EmbeddingCache`, in its
storage dtype (fp16/bf16 entries are converted on the device, after a copy of half the bytes).

The GT box is the target's union box mapped into the letterbox, for no-target samples too: their
union box (0, 0, 0, 0) lands on the letterbox's top-left corner, (offset_x / S, offset_y / S, 0, 0)
with S the CLIP input size. That is the release's no-target box target: its gRefCOCO files give
such refs the box [0, 0, 0, 0] and its transforms add the letterbox shift before the cxcywh / S.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..backbones.clip_tokenizer import CLIPTokenizer
from ..backbones.sam_frames import mask_to_padded_frame
from ..errors import ConfigError, DatasetError
from ..image_io import load_image
from ..letterbox import fixed_placements, letterbox_image
from .embedding_cache import EmbeddingCache
from .records import ReferringDataset, ReferringSample


def check_expression_weights(
    weights: Mapping[str, float],
    key: str = "train.expression_weights",
    dataset: ReferringDataset | None = None,
    annotation: str = "kind",
) -> None:
    """Raise ConfigError naming the first weight (of ``key``) that is not > 0 and, given the training set,
    the first weighted value that none of its sentences has as ``annotation`` (train.expression_weight_key):
    such a weight (a typo, "l" for "L", or a data set without the annotation) would silently change nothing."""
    for value, weight in weights.items():
        if not weight > 0:
            raise ConfigError(f"{key}.{value}: must be > 0, got {weight}")
    if dataset is None or not weights:
        return
    present = {
        str(meta[annotation])
        for sample in dataset
        for meta in (sample.sentence_meta(i) for i in range(len(sample.expressions)))
        if annotation in meta
    }
    missing = [str(value) for value in weights if str(value) not in present]
    if missing:
        found = f"values present: {', '.join(sorted(present))}" if present else "no sentence carries that annotation"
        raise ConfigError(
            f"{key}.{missing[0]}: no sentence of {dataset.name}/{dataset.split} has {annotation}={missing[0]!r} "
            f"(train.expression_weight_key={annotation}; {found}), so the weight would change nothing"
        )


def referent_weights(dataset: ReferringDataset, weights: Mapping[str, float], key: str = "kind") -> Tensor:
    """(N,) float64 sampling weight per referent: the mean weight of its sentences' ``key`` values.

    A value without a weight counts 1, so {"L": 4.0} makes a referent whose sentences are all
    location sentences four times as likely as one with none, and one with half of each 2.5 times.
    """
    check_expression_weights(weights, "train.referent_weights", dataset, key)
    return torch.tensor([
        float(np.mean([weights.get(str(sample.sentence_meta(i).get(key)), 1.0) for i in range(len(sample.expressions))]))
        for sample in dataset
    ], dtype=torch.float64)


class ReferringTrainingSet(Dataset):
    """Items for SSP-SAM training.

    Items are indexed by ``(epoch, index)``; each is a dict:
        clip_pixels: (3, S_clip, S_clip) letterboxed CLIP input: with ``augment``, placed at uniform
            random integer offsets (the release), or, with ``placements`` = K > 0, at one of K fixed
            offsets (``letterbox.fixed_placements``), so that an image's CLIP input takes only K
            values and its frozen CLIP tokens can be cached; centred without ``augment``.
        tokens: (77,) token ids of one expression of the referent.
        sam_embedding: (C, h, w) cached SAM embedding of the image in the cache's storage dtype
            (fp32, fp16 or bf16); absent without a cache (the REC pretraining stage, which does not
            run SAM).
        mask: (S/2, S/2) float GT in the padded SAM frame, 0/1 (the "area" target: coverage in [0, 1];
            all zero for no-target), made by
            ``mask_frame(mask (H, W) bool, S)``: pixel-centred nearest by default, the release's
            own processing when the trainer says so (``model.mask_target``); absent when
            ``need_masks`` is False (the REC stage trains on boxes only).
        box: (4,) GT (cx, cy, w, h) normalised to the CLIP square; for no-target the letterbox's
            top-left corner (offset_x / S_clip, offset_y / S_clip, 0, 0), as the release.
        index: () the sample's index (for debugging and tests).
    """

    def __init__(
        self,
        dataset: ReferringDataset,
        cache: EmbeddingCache | None,
        clip_image_size: int,
        sam_image_size: int,
        tokenizer: CLIPTokenizer,
        seed: int,
        augment: bool = True,
        placements: int = 0,
        need_masks: bool = True,
        expression_weights: Mapping[str, float] | None = None,
        expression_weight_key: str = "kind",
        mask_frame: Callable[[np.ndarray, int], Tensor] = mask_to_padded_frame,
    ) -> None:
        self.dataset = dataset
        self.cache = cache
        self.clip_image_size = clip_image_size
        self.sam_image_size = sam_image_size
        self.tokenizer = tokenizer
        self.seed = seed
        self.augment = augment
        self.placements = placements
        self.need_masks = need_masks
        self.mask_frame = mask_frame
        self.expression_weights = dict(expression_weights or {})
        self.expression_weight_key = expression_weight_key
        check_expression_weights(self.expression_weights, dataset=dataset, annotation=expression_weight_key)
        if need_masks:
            box_only = [s.sample_id for s in dataset if not s.no_target and not s.has_mask]
            if box_only:
                raise DatasetError(
                    f"{dataset.name}/{dataset.split}: {len(box_only)} samples have boxes but no masks "
                    f"(e.g. {box_only[:3]}); mask training needs masks (use them in the REC stage only)"
                )

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        """The item of sample ``index`` in epoch ``epoch``, ``key = (epoch, index)``."""
        epoch, index = key
        sample = self.dataset[index]
        rng = np.random.default_rng([self.seed, epoch, index])
        expression = sample.expressions[self._draw_sentence(sample, rng)]
        image = load_image(sample.image_path)
        if self.augment:
            generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
            placement = "random"
            if self.placements:  # one of K fixed placements, so the CLIP input repeats and its tokens can be cached
                options = fixed_placements(image.shape[0], image.shape[1], self.clip_image_size, self.placements)
                placement = options[int(torch.randint(len(options), (), generator=generator))]
            clip_pixels, letterbox = letterbox_image(image, self.clip_image_size, placement, generator)
        else:
            clip_pixels, letterbox = letterbox_image(image, self.clip_image_size)
        box = letterbox.box_from_image(torch.tensor(sample.union_box_xyxy(), dtype=torch.float32))
        item = {"clip_pixels": clip_pixels, "tokens": self.tokenizer([expression])[0], "box": box, "index": torch.tensor(index)}
        if self.cache is not None:
            item["sam_embedding"] = self.cache.get(sample.image_path, dtype=None)
        if self.need_masks:
            mask = np.zeros(image.shape[:2], dtype=bool) if sample.no_target else sample.mask()
            item["mask"] = self.mask_frame(mask, self.sam_image_size)
        return item

    def _draw_sentence(self, sample: ReferringSample, rng: np.random.Generator) -> int:
        """Index of the sentence used for this visit: uniform, or by ``expression_weights``."""
        if not self.expression_weights:
            return int(rng.integers(len(sample.expressions)))
        weights = np.array([
            self.expression_weights.get(str(sample.sentence_meta(i).get(self.expression_weight_key)), 1.0)
            for i in range(len(sample.expressions))
        ])
        return int(rng.choice(len(weights), p=weights / weights.sum()))


class EpochBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Deterministic batches, identical in content whatever the number of processes.

    Every epoch draws one order of the dataset from (seed, epoch): a permutation (each referent
    once, the release), or, with ``weights`` (N,), N indices drawn with replacement in proportion
    to them. Global batch b is order[b*B:(b+1)*B] and rank r takes its r-th contiguous share of
    B / world_size items. The incomplete last global batch is dropped, so every step averages over
    exactly B items. A batch is a list of ``(epoch, index)`` keys of :class:`ReferringTrainingSet`.
    """

    def __init__(
        self, size: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1, weights: Tensor | None = None
    ) -> None:
        if global_batch % world_size:
            raise ValueError(f"batch size {global_batch} is not divisible by the {world_size} processes")
        if weights is not None and weights.shape != (size,):
            raise ValueError(f"sampling weights of shape {tuple(weights.shape)} for a dataset of {size} items")
        self.weights = weights
        self.size = size
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.seed = seed
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // self.global_batch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is None:
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = torch.multinomial(self.weights, self.size, replacement=True, generator=generator).tolist()
        for step in range(len(self)):
            start = step * self.global_batch + self.rank * self.local_batch
            yield [(self.epoch, index) for index in order[start : start + self.local_batch]]


def collate(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stack the items' tensors along a new batch dimension."""
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}
