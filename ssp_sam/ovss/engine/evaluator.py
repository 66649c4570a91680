"""Evaluate an OVSS model on one split: confusion matrix, metrics.md's OVSS scores, SAM prompts and time per image.

Each image is predicted at the model's input size and its per-class probabilities brought back to the
image's own size (bilinear) before the argmax, as CAT-Seg's ``sem_seg_postprocess`` does:

- ``sliding_window=true`` (CAT-Seg's inference for large images): the image resized to ``out_size``,
  windows of ``window`` with ``overlap``, plus the whole image as one window; one forward per image for
  all of them (:func:`ssp_sam.ovss.sliding_window.sliding_window_inference`). CAT-Seg + SAM vote votes
  once, on that averaged prediction, with SAM's masks of the whole image (``ssp_sam/ovss/sam_vote.py``).
- ``sliding_window=false``: the whole image resized to the input square, ``batch_size`` images per
  forward. Only here can SAM's image embedding come from the cache, whose OVSS entries embed exactly
  this input (the image resized to the square, any size or aspect ratio: ``ssp_sam/engine/caching.py``).

The class embeddings of the dataset's vocabulary are computed once. Scores accumulate on the device
(no host sync per image); under DDP each rank scores every N-th image and the counts are summed.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from ...data.embedding_cache import EmbeddingCache
from ...engine.distributed import DistInfo
from ...engine.host_memory import default_host_memory_in_worker, shared_with_forked_workers
from ...engine.precision import Precision
from ..data.dataset import SemSegDataset
from ..model import OVSSModel
from ..resize import resize_image, resize_probabilities
from ..sam_mi.proposals import Proposals
from ..sam_vote import CATSegSAMVote
from ..sliding_window import sliding_window_inference
from .data import EvaluationImages, as_list, check_model_input_cache
from .train_config import OVSSEvalSection, settled_eval_section


@dataclass
class OVSSEvalResult:
    metrics: dict[str, float]  # mIoU, fwIoU, pAcc, mACC (+ mIoU seen / unseen, hIoU), fractions
    per_class_iou: dict[str, float | None]  # by label class name; None where the class is not scored
    n_images: int
    sam_prompts_per_image: float | None  # point prompts given to SAM's decoder per image (None: no SAM)
    sam_masks_per_image: float | None  # SAM's masks kept by the proposal filters per image (None: no SAM)
    seconds_per_image: float  # wall-clock seconds of the evaluation loop / images (all processes together)
    sliding_window: bool
    precision: str


class _Predictor:
    """Per-class probabilities of image batches, counting SAM's point prompts and kept masks on the device."""

    def __init__(self, model: OVSSModel, text: Tensor, precision: Precision, device: torch.device) -> None:
        self.model, self.text, self.precision, self.device = model, text, precision, device
        self.prompts = torch.zeros((), dtype=torch.int64, device=device)
        self.masks = torch.zeros((), dtype=torch.int64, device=device)
        self.uses_sam = False

    def __call__(self, images: Tensor, sam_embeddings: Tensor | None = None) -> Tensor:
        """(N, 3, S, S) on 0..255 -> (N, T, S, S) float32 probabilities."""
        with self.precision.autocast(self.device):
            output = self.model(images, self.text, sam_embeddings)
            probabilities = self.model.probabilities(output)
        if output.proposals is not None:
            self._count(output.proposals)
        return probabilities.float()

    def sliding_window(self, image: Tensor, options: OVSSEvalSection) -> Tensor:
        """(3, H, W) on 0..255 -> (T, H, W) float32 probabilities by CAT-Seg's sliding window.

        CAT-Seg + SAM vote votes once per image, as the baseline is defined: its views are CAT-Seg's alone,
        then SAM's masks of the whole image vote on the averaged prediction (``CATSegSAMVote.vote_on_image``).
        """
        if not isinstance(self.model, CATSegSAMVote):
            return sliding_window_inference(self, image, options.window, options.overlap, options.out_size)
        voted, proposals = self.model.sliding_window_vote(
            image, self.text, options.window, options.overlap, options.out_size, lambda: self.precision.autocast(self.device)
        )
        self._count(proposals)
        return voted

    def _count(self, proposals: Proposals) -> None:
        self.uses_sam = True
        self.prompts += proposals.num_prompts.sum()
        self.masks += proposals.valid.sum()


@torch.no_grad()
def evaluate_ovss(
    model: OVSSModel,
    dataset: SemSegDataset,
    options: OVSSEvalSection,
    device: torch.device,
    precision: Precision,
    cache: EmbeddingCache | None = None,
    dist_info: DistInfo = DistInfo(),
    progress: bool = True,
    max_images: int | None = None,
    workers: int = 2,
) -> OVSSEvalResult:
    """Score ``model`` on ``dataset`` (every rank returns the same result).

    Args:
        options: sliding window or whole images, and batch size (``eval:`` of the configs; window and out_size
            null: their defaults for this model, :func:`settled_eval_section`).
        cache: SAM embeddings of the model's input (only without the sliding window): an OVSS cache,
            ``ensure_cache(..., model_input_size=model.image_size)``.
        max_images: score the first n images only (validation during training).
    """
    if cache is not None and options.sliding_window:
        raise ValueError("cached SAM embeddings are of whole images: they need sliding_window=false")
    model.eval()
    size = model.image_size
    check_model_input_cache(cache, size)
    options = settled_eval_section(options, size)
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    indices = list(range(count))[dist_info.rank :: dist_info.world_size]
    batch_size = 1 if options.sliding_window else options.batch_size
    loader = torch.utils.data.DataLoader(
        EvaluationImages(dataset, indices, cache), batch_size=batch_size, collate_fn=as_list, num_workers=workers,
        worker_init_fn=default_host_memory_in_worker,
    )
    with precision.autocast(device):
        text = model.encode_classes(dataset.class_names)
    predictor = _Predictor(model, text, precision, device)
    confusion = dataset.confusion_matrix(device)
    bar = tqdm(total=len(indices), desc=f"{dataset.name} {dataset.split}", unit="img", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    started = time.perf_counter()
    with bar, shared_with_forked_workers(enabled=workers > 0):  # the workers are forked from here: see its docstring
        for batch in loader:
            if options.sliding_window:
                probabilities = [predictor.sliding_window(batch[0]["image"].to(device).float(), options)]
            else:
                inputs = torch.stack([resize_image(item["image"].to(device), (size, size)) for item in batch])
                embeddings = torch.stack([item["sam_embedding"] for item in batch]).to(device) if cache is not None else None
                square = predictor(inputs, embeddings)
                probabilities = [resize_probabilities(p, tuple(item["label"].shape)) for p, item in zip(square, batch)]
            for p, item in zip(probabilities, batch):
                confusion.update(p.argmax(dim=0), item["label"].to(device))
            bar.update(len(batch))
    counts = torch.stack([predictor.prompts, predictor.masks, torch.tensor(len(indices), device=device)])
    if dist_info.enabled:
        confusion.all_reduce()
        dist.all_reduce(counts)
    prompts, masks, images = counts.tolist()  # the one host sync
    seconds = time.perf_counter() - started
    names = dataset.label_class_names
    return OVSSEvalResult(
        metrics=confusion.compute(unseen=dataset.unseen_indices),
        per_class_iou={name: (None if value != value else value) for name, value in zip(names, confusion.per_class_iou())},
        n_images=int(images),
        sam_prompts_per_image=prompts / images if predictor.uses_sam and images else None,
        sam_masks_per_image=masks / images if predictor.uses_sam and images else None,
        seconds_per_image=seconds / max(images, 1),
        sliding_window=options.sliding_window,
        precision=precision.name,
    )


def result_record(result: OVSSEvalResult) -> dict[str, Any]:
    """The result's entries of a results JSON (``scripts/eval.py`` adds dataset, model, checkpoint, command)."""
    return {
        "metrics": dict(result.metrics),
        "per_class_iou": dict(result.per_class_iou),
        "n_images": result.n_images,
        "sam_prompts_per_image": result.sam_prompts_per_image,
        "sam_masks_per_image": result.sam_masks_per_image,
        "seconds_per_image": result.seconds_per_image,
        "protocol": "sliding_window" if result.sliding_window else "whole_image",
        "precision": result.precision,
    }


def console_line(result: OVSSEvalResult) -> str:
    """One line of percentages, as the README tables show them."""
    shown = "  ".join(f"{name} {100 * value:.2f}" for name, value in result.metrics.items())
    sam = ""
    if result.sam_prompts_per_image is not None:
        sam = f"  SAM prompts/image {result.sam_prompts_per_image:.1f}  masks kept/image {result.sam_masks_per_image:.1f}"
        if result.sam_masks_per_image == 0:
            sam += " (SAM kept no mask: its masks changed nothing; see ovss_model.proposals.*)"
    return f"{shown}{sam}  s/image {result.seconds_per_image:.3f}"
