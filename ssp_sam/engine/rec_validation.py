"""Validation of the REC pretraining stage: box accuracy, computed without SAM.

The release validates its pretraining on the merged set's val split by Acc@0.5 (an item counts
when its predicted box has IoU >= 0.5 with the GT box, in original-image pixels) and keeps the
epoch with the best value. Its val items are those of its training set: one per sentence (of at
most 40 words), each drawing one sentence of its referent at random (``data/sentence_samples.py``).
Here every sentence of every val sample is scored once and the accuracy is over sentences
(formats.md: evaluation is per sentence): a referent counts as often as it has sentences, as in the
release, whose expected value this is without the randomness (exactly so when no sentence of the
split has more than 40 words). Until 2026-12-01 each referent counted once, the mean of its
sentences (found by an audit).

Only CLIP, the adapters and the prompt generator run: no SAM image embedding and no mask decoder,
so the REC stage needs no SAM at all.
"""

from __future__ import annotations

import torch
from torchvision.ops import box_iou

from ..backbones.clip_tokenizer import CLIPTokenizer
from ..data.records import ReferringDataset
from ..errors import DatasetError
from ..image_io import load_image
from ..letterbox import letterbox_image
from ..metrics import REC_IOU_THRESHOLD
from ..model import SSPSAM
from .distributed import DistInfo

REC_METRIC = "REC-acc"


@torch.no_grad()
def rec_accuracy(
    model: SSPSAM,
    dataset: ReferringDataset,
    device: torch.device,
    dist_info: DistInfo = DistInfo(),
    max_batch: int = 32,
) -> dict[str, float]:
    """Box accuracy over the sentences of ``dataset``'s samples.

    The prediction is mapped from the centred CLIP letterbox back to the original image and
    clipped to it, as the release's post-processing does; the GT is the referent's union box.
    Ranks split the samples and add up their sums, so every rank returns the same numbers.

    Args:
        max_batch: samples (images) encoded together; all their sentences are decoded together.
    Returns:
        {"REC-acc": share of sentences with box IoU >= 0.5, "box_mIoU": mean box IoU over sentences,
        "n_samples", "n_sentences"}.
    """
    if len(dataset) == 0:
        raise DatasetError(f"dataset {dataset.name} split {dataset.split}: no samples to validate on")
    model.eval()
    tokenizer = CLIPTokenizer(model.clip.context_length, model.config.append_period)
    samples = dataset.samples[dist_info.rank :: dist_info.world_size]
    totals = torch.zeros(4, dtype=torch.float64)  # sums: hits, box IoUs, samples, sentences
    for start in range(0, len(samples), max_batch):
        chunk = samples[start : start + max_batch]
        placed = [letterbox_image(load_image(sample.image_path), model.clip.image_size) for sample in chunk]
        image_tokens = model.encode_clip_image(torch.stack([pixels for pixels, _ in placed]).to(device))
        counts = torch.tensor([len(sample.expressions) for sample in chunk])
        tokens = tokenizer([expression for sample in chunk for expression in sample.expressions]).to(device)
        image_index = torch.repeat_interleave(torch.arange(len(chunk)), counts).to(device)
        boxes = model.decode(image_tokens[image_index], None, model.encode_text(tokens)).boxes.float().cpu()
        for sample, (_, letterbox), predicted in zip(chunk, placed, boxes.split(counts.tolist())):
            in_image = letterbox.box_to_image(predicted)  # clipped to the image, as the release scores it
            gt = torch.tensor([sample.union_box_xyxy()], dtype=in_image.dtype)
            ious = torch.nan_to_num(box_iou(in_image, gt)[:, 0].double(), nan=0.0)
            totals += torch.tensor([(ious >= REC_IOU_THRESHOLD).double().sum(), ious.sum(), 1.0, len(ious)], dtype=torch.float64)
    if dist_info.enabled:
        reduced = totals.to(device)
        torch.distributed.all_reduce(reduced)
        totals = reduced.cpu()
    hits, ious, samples, sentences = totals.tolist()
    return {REC_METRIC: hits / sentences, "box_mIoU": ious / sentences, "n_samples": int(samples), "n_sentences": int(sentences)}
