"""Frozen SAM as a mask proposer: the image embedding once per image, point prompts -> filtered masks.

The filters are SamAutomaticMaskGenerator's (segment_anything.utils.amg): three masks per point,
kept when SAM's predicted IoU and the stability score pass their thresholds, then box NMS per image.
Unlike the generator (which embeds the image itself, per crop) the embedding is an input here, so one
embedding per image serves both the proposals and SAM-MI's mask injection, and no crops are used.
The stability score and boxes are computed on SAM's low-resolution logits (4x the embedding grid:
256 x 256 for SAM's 1024 input), where the masks are kept.

Images are square (the OVSS models run on square crops), so SAM's resize fills its whole input frame
and a low-resolution mask covers exactly the image.

SAM's input is :func:`ssp_sam.backbones.sam_frames.sam_input`, the function the OVSS embedding cache's
preprocessing (:class:`~ssp_sam.backbones.sam_frames.ModelInputTransform`) also uses, so cached entries
are exactly what :meth:`SAMProposer.embed` computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.utils.amg import batched_mask_to_box, build_point_grid, calculate_stability_score
from torch import Tensor, nn
from torchvision.ops import batched_nms

from ...attention import fuse_two_way_attention
from ...backbones.sam_decoder import decode_prompt_sets, hypernetwork_masks
from ...backbones.sam_frames import sam_input
from ..model_config import ProposalConfig

MASK_THRESHOLD = 0.0  # SAM's: a logit above it is inside the mask


@dataclass
class Proposals:
    """SAM's mask proposals of a batch, padded to the largest count M."""

    logits: Tensor  # (B, M, Hm, Wm) SAM's low-resolution mask logits (> 0: inside)
    valid: Tensor  # (B, M) bool: a real proposal (not padding)
    scores: Tensor  # (B, M) SAM's predicted IoU
    num_prompts: Tensor  # (B,) point prompts given to SAM per image

    def masks(self, size: int) -> Tensor:
        """(B, M, size, size) binary masks (float 0/1) at ``size``, padding proposals empty.

        Upsampled by bilinear interpolation of the logits then thresholded at 0 (SAM's postprocessing);
        downsampled by the area fraction of the binary low-resolution mask (a soft membership).
        """
        if self.logits.shape[1] == 0:  # no proposal survived the filters in any image
            return self.logits.new_zeros(*self.logits.shape[:2], size, size)
        if size >= self.logits.shape[-1]:
            upsampled = F.interpolate(self.logits, size=(size, size), mode="bilinear", align_corners=False)
            masks = (upsampled > MASK_THRESHOLD).float()
        else:
            masks = F.adaptive_avg_pool2d((self.logits > MASK_THRESHOLD).float(), (size, size))
        return masks * self.valid[:, :, None, None]


def grid_points(side: int, image_size: int, batch: int, device: torch.device) -> Tensor:
    """SAM's automatic grid (``build_point_grid``): (batch, side^2, 2) (x, y) points in input pixels."""
    grid = torch.as_tensor(build_point_grid(side), dtype=torch.float32, device=device) * image_size
    return grid.expand(batch, -1, -1)


class SAMProposer(nn.Module):
    """Frozen SAM (image encoder, prompt encoder, mask decoder of ``segment_anything``)."""

    def __init__(self, sam: Sam, config: ProposalConfig) -> None:
        super().__init__()
        self.image_encoder = sam.image_encoder
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = fuse_two_way_attention(sam.mask_decoder)  # points share their image (image_of)
        self.register_buffer("pixel_mean", sam.pixel_mean.clone(), persistent=False)
        self.register_buffer("pixel_std", sam.pixel_std.clone(), persistent=False)
        self.config = config
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> SAMProposer:
        """SAM is frozen: always in eval mode."""
        return super().train(False)

    @property
    def sam_size(self) -> int:
        return self.prompt_encoder.input_image_size[0]

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) RGB on 0..255 -> (B, C, h, w) SAM image embeddings (resized to SAM's side, antialiased)."""
        return self.image_encoder(sam_input(images, self.sam_size, self.pixel_mean, self.pixel_std))

    @torch.no_grad()
    def propose(self, embeddings: Tensor, points: Tensor, valid: Tensor, image_size: int) -> Proposals:
        """Masks for every valid point, filtered, per image.

        Args:
            embeddings: (B, C, h, w) from :meth:`embed`.
            points: (B, N, 2) (x, y) in input pixels of the S x S image, S = ``image_size``.
            valid: (B, N) bool, which points to prompt.
        """
        config = self.config
        batch = embeddings.shape[0]
        image_ids, point_ids = valid.nonzero(as_tuple=True)
        coords = points[image_ids, point_ids] * (self.sam_size / image_size)
        low_res = embeddings.shape[-1] * 4
        logits, scores, owners = [embeddings.new_zeros(0, low_res, low_res)], [embeddings.new_zeros(0)], [image_ids[:0]]
        for start in range(0, coords.shape[0], config.points_per_batch):  # filtered per chunk, as SAM's AMG
            chunk = slice(start, start + config.points_per_batch)
            masks, iou = self._decode(embeddings, image_ids[chunk], coords[chunk])
            per_point = masks.shape[1]  # 3, or 1 without multimask_output
            masks, iou = masks.flatten(0, 1), iou.flatten()
            stability = calculate_stability_score(masks, MASK_THRESHOLD, config.stability_score_offset)
            keep = (iou >= config.pred_iou_thresh) & (stability >= config.stability_score_thresh)
            logits.append(masks[keep])
            scores.append(iou[keep])
            owners.append(image_ids[chunk].repeat_interleave(per_point)[keep])
        logits_all, scores_all, owners_all = torch.cat(logits), torch.cat(scores), torch.cat(owners)
        kept = batched_nms(batched_mask_to_box(logits_all > MASK_THRESHOLD).float(), scores_all, owners_all, config.box_nms_thresh)
        num_prompts = valid.sum(dim=1)
        return _pack(logits_all[kept], scores_all[kept], owners_all[kept], batch, num_prompts)

    def _decode(self, embeddings: Tensor, image_ids: Tensor, coords: Tensor) -> tuple[Tensor, Tensor]:
        """SAM's masks per point (three, or one without ``multimask_output``), for points of different images
        in one decoder call.

        What ``MaskDecoder.forward`` gives each (image, point), without copying an image's embedding per
        point: the points name their image and its first-block work runs once (:func:`decode_prompt_sets`,
        :func:`hypernetwork_masks`).

        Returns:
            (n, m, 4h, 4w) mask logits and (n, m) predicted IoUs, m = 3 or 1.
        """
        decoder = self.mask_decoder
        labels = torch.ones(coords.shape[0], 1, device=coords.device)
        sparse, _ = self.prompt_encoder(points=(coords[:, None, :], labels), boxes=None, masks=None)
        token_out, image_out = decode_prompt_sets(self.prompt_encoder, decoder, embeddings, sparse, image_ids)
        outputs = range(1, decoder.num_mask_tokens) if self.config.multimask_output else range(1)
        masks = hypernetwork_masks(decoder, token_out, image_out, outputs)
        iou = decoder.iou_prediction_head(token_out[:, 0])[:, outputs.start : outputs.stop]
        return masks, iou


def _pack(logits: Tensor, scores: Tensor, owners: Tensor, batch: int, num_prompts: Tensor) -> Proposals:
    """Flat proposals with their image ids -> padded (B, M, ...) tensors, each image's by decreasing score."""
    order = torch.argsort(scores, descending=True)
    order = order[torch.argsort(owners[order], stable=True)]  # by image, then by decreasing score
    logits, scores, owners = logits[order], scores[order], owners[order]
    counts = torch.bincount(owners, minlength=batch)
    width = int(counts.max()) if owners.numel() else 0
    starts = torch.cumsum(counts, 0) - counts
    slots = torch.arange(owners.shape[0], device=owners.device) - starts[owners]
    size = logits.shape[-1]
    padded = logits.new_full((batch, width, size, size), -1.0)
    padded_scores = scores.new_zeros(batch, width)
    valid = torch.zeros(batch, width, dtype=torch.bool, device=owners.device)
    padded[owners, slots] = logits
    padded_scores[owners, slots] = scores
    valid[owners, slots] = True
    return Proposals(logits=padded, valid=valid, scores=padded_scores, num_prompts=num_prompts)
