"""SAM-style promptable-segmentation pretraining of a small SAM on ShapeWorld scenes.

Nothing pretrained can be downloaded where ``ssp_sam`` is built, so the SAM of our ShapeWorld model
(configs/model/shapeworld.yaml) is trained here from scratch the way SAM was: an image, a prompt
(positive / negative clicks or a jittered box) for one instance, and that instance's mask as the
target. SSP-SAM later keeps the image encoder frozen and fine-tunes the mask decoder, so what
matters is an image embedding that separates instances and a decoder that reads it.

Recipe (SAM paper, section 3 and appendix A, cut down to one round of prompting):
- Scenes: ``generate_scene(seed, "train", i)`` for i < ``pool_size``, generated once at the start
  and reused, each time under one of the 8 flips / quarter turns and with new prompts (fresh scenes
  every step would cost a tenth of the step). Held-out scenes: the "val" split of the same seed, a
  different random stream.
- Prompts, per (image, instance): with probability ``box_probability`` the instance's bounding
  box, each coordinate jittered by Gaussian noise of std 10% of the box side (capped at 20 px);
  otherwise 1 to ``max_positive_points`` clicks drawn uniformly inside the mask and, half of the
  time, 1 to ``max_negative_points`` clicks outside it.
- Output: a single mask (SAM's mask token 0, ``multimask_output=False``): ShapeWorld objects are
  flat shapes without parts, so a click is never ambiguous, and token 0 is the output SSP-SAM uses.
- Loss: focal (x 20) + dice (x 1) on the logits in the padded frame (``upscale_to_padded_frame``
  against ``mask_to_padded_frame``), plus the MSE of SAM's IoU head against the IoU of the
  thresholded prediction, as in SAM. AdamW with warm-up and cosine decay, gradients clipped.
  With ``loss_frame="image"`` the focal and dice terms compare, at the image's own resolution, the
  logits mapped back exactly as the evaluation maps them (``padded_frame_to_original``) with the
  full-resolution masks: the padded-frame targets sample every second pixel (2i + 1), which the
  bilinear mapping back places half an image pixel off, so that even the target itself, mapped back,
  has IoU 0.91 with a small disc (r = 12; docs/pretraining.md).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import PromptEncoder, Sam
from torch import Tensor
from tqdm import tqdm

from ..backbones.sam import build_sam
from ..backbones.sam_frames import (
    SAMImageTransform,
    mask_to_padded_frame,
    padded_frame_to_original,
    upscale_to_padded_frame,
)
from ..data.shapeworld import Scene, generate_scene
from ..engine.config_fields import number
from ..engine.optim import cosine_schedule
from ..errors import ConfigError
from ..fileio import atomic_path
from ..losses import dice_loss, focal_loss
from .stage import StageControl, check_settings, finish_stage, finished_report, prepare_stage_files, read_state, run_steps

TRAIN_SPLIT = "train"
HELDOUT_SPLIT = "val"
NOT_A_POINT = -1  # SAM's label of a padding point slot
LOSS_FRAMES = ("padded", "image")  # where the focal and dice terms compare masks (module docstring)
BOX_JITTER_FRACTION = 0.1  # SAM: noise std = 10% of the box side ...
BOX_JITTER_MAX = 20.0  # ... at most 20 px

# A function from an image (H, W, 3) uint8 and K clicks (K, 2) as (x, y) pixel indices to K masks (K, H, W) bool.
PointSegmenter = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class SAMPretrainSettings:
    """Hyper-parameters of :func:`pretrain_sam` (configs/pretrain_sam.yaml gives the defaults used).

    Each number has its range (:func:`~ssp_sam.pretrain.stage.check_settings`, one error naming the key):
    a negative learning rate, weight decay or loss weight, or a clip norm <= 0, would train the model
    away from its objective with no error. A zero learning rate trains nothing and is allowed.
    """

    steps: int = number(900, 1)
    batch_size: int = number(8, 1)  # images per step
    prompts_per_image: int = number(8, 1)  # instances prompted per image (drawn with replacement)
    lr: float = number(3e-3, 0)
    min_lr: float = number(1e-5, 0)
    weight_decay: float = number(0.05, 0)
    warmup_steps: int = number(40, 0)
    grad_clip: float = number(1.0, 0, above=True)  # gradient norm clipped to this (always on)
    seed: int = number(1000, 0)
    pool_size: int = number(2000, 1)  # training scenes generated once and reused (drawn with replacement)
    eval_scenes: int = number(200, 0)  # held-out scenes for the final mIoU
    box_probability: float = number(0.25, 0)  # at most 1
    max_positive_points: int = number(3, 1)
    max_negative_points: int = number(2, 0)
    focal_weight: float = number(20.0, 0)
    dice_weight: float = number(1.0, 0)
    iou_weight: float = number(1.0, 0)
    loss_frame: str = "padded"  # one of LOSS_FRAMES

    def __post_init__(self) -> None:
        if self.loss_frame not in LOSS_FRAMES:
            raise ConfigError(f"loss_frame: expected one of {', '.join(LOSS_FRAMES)}, got {self.loss_frame!r}")
        check_settings(self)
        if not 0.0 <= self.box_probability <= 1.0:
            raise ConfigError(f"box_probability: must lie in [0, 1], got {self.box_probability}")

    @property
    def point_slots(self) -> int:
        """Point slots of every prompt: the clicks, then NOT_A_POINT padding."""
        return self.max_positive_points + self.max_negative_points


@dataclass
class SAMPretrainResult:
    losses: list[float]  # training loss of every step done (all steps when finished)
    heldout_miou: float  # mean IoU over the held-out instances, one click at each centre (nan if not finished)
    heldout_instances: int
    seconds: float  # wall time of this session (scene generation, training, evaluation, saving)
    finished: bool = True  # False: stopped early (stop_after_steps / max_minutes)
    state_saved: bool = False  # stopped early and the stage state holds every step done (resume=true continues)


# ---------------------------------------------------------------------------------------------------
# Scenes and prompts
# ---------------------------------------------------------------------------------------------------


@dataclass
class ScenePool:
    """Training scenes kept compactly: objects never overlap, so one label map holds every mask.

    images: (N, H, W, 3) uint8; labels: (N, H, W) uint8 with 0 = background and k = object k - 1;
    object_counts: (N,) objects per scene.
    """

    images: np.ndarray
    labels: np.ndarray
    object_counts: np.ndarray

    @classmethod
    def generate(cls, seed: int, split: str, count: int, progress: bool = False) -> "ScenePool":
        scenes = (generate_scene(seed, split, index) for index in range(count))
        if progress:
            scenes = tqdm(scenes, total=count, desc=f"scenes ({split}, seed {seed})", leave=False)
        images, labels, counts = [], [], []
        for scene in scenes:
            label_map = np.zeros(scene.image.shape[:2], dtype=np.uint8)
            for label, obj in enumerate(scene.objects, start=1):
                label_map[obj.mask] = label
            images.append(scene.image)
            labels.append(label_map)
            counts.append(len(scene.objects))
        return cls(np.stack(images), np.stack(labels), np.array(counts))

    def __len__(self) -> int:
        return len(self.images)


def random_dihedral(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The same random flip / quarter turn (one of 8) of an image (H, W, 3) and its label map (H, W)."""
    turns = int(rng.integers(4))
    image, labels = np.rot90(image, turns), np.rot90(labels, turns)
    if rng.random() < 0.5:
        image, labels = image[:, ::-1], labels[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(labels)


@dataclass
class PromptBatch:
    """M prompt sets in the original image's pixel frame, grouped by image (K consecutive sets per image).

    coords: (M, P, 2) float (x, y) pixel indices; labels: (M, P) long, 1 positive, 0 negative,
    NOT_A_POINT for an unused slot; boxes: (M, 4) float x1, y1, x2, y2 (read only where has_box);
    has_box: (M,) bool. A set with a box leaves its last point slot unused, so that every set gives
    the same number of tokens (P + 1) to the mask decoder.
    """

    coords: Tensor
    labels: Tensor
    boxes: Tensor
    has_box: Tensor

    @classmethod
    def clicks(cls, coords: np.ndarray, labels: np.ndarray) -> "PromptBatch":
        """Point-only prompt sets from (M, P, 2) coordinates and (M, P) labels."""
        count = coords.shape[0]
        return cls(
            torch.as_tensor(coords, dtype=torch.float32),
            torch.as_tensor(labels, dtype=torch.long),
            torch.zeros(count, 4),
            torch.zeros(count, dtype=torch.bool),
        )

    def to(self, device: torch.device | str) -> "PromptBatch":
        return PromptBatch(self.coords.to(device), self.labels.to(device), self.boxes.to(device), self.has_box.to(device))

    def resized(self, transform: SAMImageTransform, original_size: tuple[int, int]) -> "PromptBatch":
        """The same prompts in SAM's input frame (ResizeLongestSide's coordinate rule)."""
        coords = transform.resize.apply_coords_torch(self.coords, original_size)
        boxes = transform.resize.apply_boxes_torch(self.boxes, original_size)
        return PromptBatch(coords, self.labels, boxes, self.has_box)


def sample_prompt(
    mask: np.ndarray, rng: np.random.Generator, settings: SAMPretrainSettings
) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """One training prompt for the instance ``mask`` (H, W) bool.

    Returns:
        coords (P, 2) float (x, y), labels (P,) int (1, 0 or NOT_A_POINT), and the jittered box
        (4,) x1, y1, x2, y2 or None. With a box, every point slot is unused.
    """
    slots = settings.point_slots
    coords = np.zeros((slots, 2))
    labels = np.full(slots, NOT_A_POINT)
    rows, cols = np.nonzero(mask)
    if rng.random() < settings.box_probability:
        box = np.array([cols.min(), rows.min(), cols.max(), rows.max()], dtype=np.float64)
        side = np.array([box[2] - box[0], box[3] - box[1]] * 2)
        noise = rng.normal(0.0, 1.0, 4) * np.minimum(BOX_JITTER_FRACTION * side, BOX_JITTER_MAX)
        height, width = mask.shape
        box = np.clip(box + noise, 0, [width - 1, height - 1, width - 1, height - 1])
        return coords, labels, np.concatenate([np.minimum(box[:2], box[2:]), np.maximum(box[:2], box[2:])])

    positives = int(rng.integers(1, settings.max_positive_points + 1))
    picked = rng.integers(len(rows), size=positives)
    coords[:positives] = np.stack([cols[picked], rows[picked]], axis=1)
    labels[:positives] = 1
    if settings.max_negative_points and rng.random() < 0.5:
        negatives = int(rng.integers(1, settings.max_negative_points + 1))
        out_rows, out_cols = np.nonzero(~mask)
        picked = rng.integers(len(out_rows), size=negatives)
        coords[positives : positives + negatives] = np.stack([out_cols[picked], out_rows[picked]], axis=1)
        labels[positives : positives + negatives] = 0
    return coords, labels, None


def sample_training_batch(
    pool: ScenePool, rng: np.random.Generator, settings: SAMPretrainSettings, transform: SAMImageTransform
) -> tuple[Tensor, PromptBatch, Tensor]:
    """One step's data: ``batch_size`` augmented pool scenes, ``prompts_per_image`` prompts each.

    Returns:
        pixels (B, 3, S, S) SAM input; prompts (B*K sets) in the input frame; targets
        (B*K, 1, S/2, S/2) instance masks in the padded frame, or with ``settings.loss_frame ==
        "image"`` (B*K, 1, H, W) at the image's resolution.
    """
    pixels, coords, labels, boxes, has_box, targets = [], [], [], [], [], []
    in_image = settings.loss_frame == "image"
    for scene_index in rng.integers(len(pool), size=settings.batch_size):
        image, label_map = random_dihedral(pool.images[scene_index], pool.labels[scene_index], rng)
        image_pixels, _ = transform(image)
        pixels.append(image_pixels)
        objects = rng.integers(1, pool.object_counts[scene_index] + 1, size=settings.prompts_per_image)
        for label in objects:
            mask = label_map == label
            point_coords, point_labels, box = sample_prompt(mask, rng, settings)
            coords.append(point_coords)
            labels.append(point_labels)
            boxes.append(box if box is not None else np.zeros(4))
            has_box.append(box is not None)
            targets.append(torch.from_numpy(mask).float() if in_image else mask_to_padded_frame(mask, transform.image_size))
    original_size = pool.images.shape[1:3]
    prompts = PromptBatch(
        torch.tensor(np.stack(coords), dtype=torch.float32),
        torch.tensor(np.stack(labels), dtype=torch.long),
        torch.tensor(np.stack(boxes), dtype=torch.float32),
        torch.tensor(has_box),
    ).resized(transform, original_size)
    return torch.stack(pixels), prompts, torch.stack(targets).unsqueeze(1)


# ---------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------


def embed_prompts(prompt_encoder: PromptEncoder, prompts: PromptBatch) -> tuple[Tensor, Tensor]:
    """SAM's prompt encoder on a mixed batch: (M, P + 1, C) sparse and (M, C, h, w) dense embeddings.

    Point-only sets get SAM's own padding point (P + 1 tokens); sets with a box drop their last,
    unused point slot and add the two corner tokens (P - 1 + 2). The two groups are encoded
    separately and put back in order.
    """
    count, slots = prompts.labels.shape
    sparse = prompts.coords.new_empty(count, slots + 1, prompt_encoder.embed_dim)
    points_only = ~prompts.has_box
    if points_only.any():
        sparse[points_only] = prompt_encoder(
            points=(prompts.coords[points_only], prompts.labels[points_only]), boxes=None, masks=None
        )[0]
    if prompts.has_box.any():
        with_box = prompts.has_box
        sparse[with_box] = prompt_encoder(
            points=(prompts.coords[with_box, :-1], prompts.labels[with_box, :-1]), boxes=prompts.boxes[with_box], masks=None
        )[0]
    dense = prompt_encoder.no_mask_embed.weight.view(1, -1, 1, 1).expand(count, -1, *prompt_encoder.image_embedding_size)
    return sparse, dense


def predict_masks(sam: Sam, pixels: Tensor, prompts: PromptBatch) -> tuple[Tensor, Tensor]:
    """SAM forward for K prompt sets per image, single-mask output, as ``Sam.forward`` loops over images.

    Args:
        pixels: (B, 3, S, S) SAM-preprocessed images.
        prompts: B * K prompt sets in the input frame, K consecutive sets per image.

    Returns:
        low-resolution mask logits (B*K, 1, 4h, 4w) and predicted IoUs (B*K, 1).
    """
    embeddings = sam.image_encoder(pixels)
    sparse, dense = embed_prompts(sam.prompt_encoder, prompts)
    per_image = sparse.shape[0] // embeddings.shape[0]
    image_pe = sam.prompt_encoder.get_dense_pe()
    logits, ious = [], []
    for index in range(embeddings.shape[0]):
        sets = slice(index * per_image, (index + 1) * per_image)
        image_logits, image_ious = sam.mask_decoder(
            image_embeddings=embeddings[index : index + 1],
            image_pe=image_pe,
            sparse_prompt_embeddings=sparse[sets],
            dense_prompt_embeddings=dense[sets],
            multimask_output=False,
        )
        logits.append(image_logits)
        ious.append(image_ious)
    return torch.cat(logits), torch.cat(ious)


def segmentation_losses(
    padded_logits: Tensor, predicted_ious: Tensor, targets: Tensor, settings: SAMPretrainSettings
) -> dict[str, Tensor]:
    """Weighted focal, dice and IoU-head losses, each averaged over the M masks.

    Args:
        padded_logits: (M, 1, S/2, S/2) logits in the padded frame (or (M, 1, H, W) in the image's
            frame, ``loss_frame="image"``); targets: same shape, 0/1.
        predicted_ious: (M, 1) SAM's IoU head, regressed onto the IoU of ``padded_logits > 0``.
    """
    count = padded_logits.shape[0]
    with torch.no_grad():
        predicted = (padded_logits > 0).flatten(1)
        truth = targets.flatten(1) > 0.5
        union = (predicted | truth).sum(1).clamp(min=1)
        actual_ious = (predicted & truth).sum(1) / union
    terms = {
        "focal": settings.focal_weight * focal_loss(padded_logits, targets) / count,
        "dice": settings.dice_weight * dice_loss(padded_logits, targets) / count,
        "iou": settings.iou_weight * F.mse_loss(predicted_ious[:, 0], actual_ious),
    }
    terms["loss"] = sum(terms.values())
    return terms


# ---------------------------------------------------------------------------------------------------
# Held-out evaluation
# ---------------------------------------------------------------------------------------------------


def centre_clicks(scene: Scene) -> np.ndarray:
    """(K, 2) click per object: the pixel (x, y) containing its centre (every shape contains its centre)."""
    return np.array([[math.floor(obj.center[0]), math.floor(obj.center[1])] for obj in scene.objects])


def point_prompt_miou(segment: PointSegmenter, scenes: Iterable[Scene]) -> tuple[float, int]:
    """Mean IoU over all instances of ``scenes``, each prompted by one click at its centre.

    Returns:
        (mean IoU, number of instances). An empty prediction has IoU 0 (every object is non-empty).
    """
    ious = []
    for scene in scenes:
        predictions = segment(scene.image, centre_clicks(scene))
        for obj, predicted in zip(scene.objects, predictions):
            union = np.logical_or(predicted, obj.mask).sum()
            ious.append(np.logical_and(predicted, obj.mask).sum() / union)
    return float(np.mean(ious)) if ious else float("nan"), len(ious)


class SAMPointSegmenter:
    """A :data:`PointSegmenter` backed by a SAM: one click per mask, with the training prompt layout."""

    def __init__(self, sam: Sam, point_slots: int, mask_target: str = "release") -> None:
        """``mask_target``: where the SAM draws its padded-frame masks (``sam_frames.MASK_TARGETS``): "nearest"
        for a SAM trained with ``loss_frame="padded"`` (its targets come from ``mask_to_padded_frame``),
        "release" for ``loss_frame="image"`` (its loss already saw the logits mapped back that way)."""
        self.sam = sam
        self.point_slots = point_slots
        self.mask_target = mask_target
        self.transform = SAMImageTransform(sam.prompt_encoder.input_image_size[0])

    @torch.no_grad()
    def __call__(self, image: np.ndarray, clicks: np.ndarray) -> np.ndarray:
        device = self.sam.prompt_encoder.no_mask_embed.weight.device
        pixels, input_size = self.transform(image)
        count = len(clicks)
        coords = np.zeros((count, self.point_slots, 2))
        coords[:, 0] = clicks
        labels = np.full((count, self.point_slots), NOT_A_POINT)
        labels[:, 0] = 1
        prompts = PromptBatch.clicks(coords, labels).resized(self.transform, image.shape[:2]).to(device)
        low_res, _ = predict_masks(self.sam, pixels[None].to(device), prompts)
        padded = upscale_to_padded_frame(low_res, self.transform.image_size)
        logits = padded_frame_to_original(padded, input_size, image.shape[:2], self.transform.image_size, self.mask_target)
        return (logits[:, 0] > 0).cpu().numpy()


def heldout_miou(
    sam: Sam, settings: SAMPretrainSettings, seed: int, split: str, count: int, progress: bool = False
) -> tuple[float, int]:
    """One click at each object's centre of ``count`` scenes ``generate_scene(seed, split, i)``: (mIoU, instances).

    The pretraining reports it on the "val" split of its training seed (a random stream disjoint from
    "train", but the one its design choices were made on); ``scripts/pretrain_sam.py`` also on the
    "test" split of a fresh seed (``test_seed``), issue 13's held-out figure.
    """
    scenes: Iterable[Scene] = (generate_scene(seed, split, index) for index in range(count))
    if progress:
        scenes = tqdm(scenes, total=count, desc=f"held-out mIoU ({split}, seed {seed})", leave=False)
    mask_target = "nearest" if settings.loss_frame == "padded" else "release"
    return point_prompt_miou(SAMPointSegmenter(sam, settings.point_slots, mask_target), scenes)


# ---------------------------------------------------------------------------------------------------
# Training and saving
# ---------------------------------------------------------------------------------------------------


def save_sam_checkpoint(sam: Sam, path: str | os.PathLike) -> None:
    """Meta's official format: ``torch.save`` of the flat state dict (image_encoder.*, prompt_encoder.*,
    mask_decoder.*), written atomically. ``Sam``'s pixel mean / std buffers are not persistent."""
    state_dict = {key: tensor.detach().cpu().clone() for key, tensor in sam.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save(state_dict, tmp)


def sam_stage_identity(sam_custom: Mapping, settings: SAMPretrainSettings) -> dict:
    """What a SAM pretraining's output depends on: a finished stage is reused only for the same."""
    return {"sam_custom": dict(sam_custom), "settings": asdict(settings)}


def finished_sam_stage(out: str | os.PathLike, sam_custom: Mapping, settings: SAMPretrainSettings) -> dict | None:
    """The report of an earlier, finished run of the same stage whose weights load, or None."""
    return finished_report(
        out, sam_stage_identity(sam_custom, settings), lambda path: build_sam("custom", checkpoint=path, custom=sam_custom)
    )


def pretrain_sam(
    sam_custom: Mapping,
    settings: SAMPretrainSettings,
    out: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    log_dir: str | os.PathLike | None = None,
    control: StageControl | None = None,
) -> tuple[Sam, SAMPretrainResult]:
    """Train a custom SAM from scratch on ShapeWorld promptable segmentation.

    Args:
        sam_custom: the ``custom`` mapping of :func:`build_sam` (configs/model/*.yaml ``sam_custom``).
        settings: hyper-parameters; ``settings.seed`` fixes initialisation, data and prompts.
        out: where to write the weights (Meta's flat .pth) and its report "{out}.json"; None writes nothing.
        device: torch device for the model.
        progress: show tqdm bars.
        log_dir: TensorBoard directory for the loss terms and learning rate, or None.
        control: saving, stopping and resuming (:class:`StageControl`); None: one uninterrupted run.

    Returns:
        The trained SAM (eval mode) and a :class:`SAMPretrainResult`. When the run stops early
        (``control``), the SAM is the one trained so far, nothing is evaluated and ``out`` is not written.
    """
    started = time.perf_counter()
    control = control or StageControl()
    # Everything that can refuse the stage comes before the minutes of scene generation.
    prepare_stage_files(out, control)
    identity = sam_stage_identity(sam_custom, settings)
    state = read_state(control, identity, settings.steps)
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    sam = build_sam("custom", custom=sam_custom).to(device).train()
    transform = SAMImageTransform(sam.prompt_encoder.input_image_size[0])
    pool = ScenePool.generate(settings.seed, TRAIN_SPLIT, settings.pool_size, progress=progress)
    original_size = tuple(pool.images.shape[1:3])
    input_size = transform.input_size_for(original_size)

    optimizer = torch.optim.AdamW(sam.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = cosine_schedule(optimizer, settings.steps, settings.warmup_steps, settings.min_lr)
    writer = _summary_writer(log_dir)

    def train_step(step: int) -> float:
        pixels, prompts, targets = sample_training_batch(pool, rng, settings, transform)
        low_res, predicted_ious = predict_masks(sam, pixels.to(device), prompts.to(device))
        logits = upscale_to_padded_frame(low_res, transform.image_size)
        if settings.loss_frame == "image":
            logits = padded_frame_to_original(logits, input_size, original_size, transform.image_size)
        terms = segmentation_losses(logits, predicted_ious, targets.to(device), settings)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(sam.parameters(), settings.grad_clip)
        optimizer.step()
        schedule.step()
        if writer is not None:
            for name, value in terms.items():
                writer.add_scalar(f"sam/{name}", value.item(), step)
            writer.add_scalar("sam/lr", schedule.get_last_lr()[0], step)
        return terms["loss"].item()

    done = run_steps(settings.steps, train_step, sam, optimizer, schedule, rng, control, "SAM pretraining", progress, identity, state)
    sam.eval()
    if not done.finished:
        if writer is not None:
            writer.close()
        return sam, SAMPretrainResult(
            done.losses, float("nan"), 0, time.perf_counter() - started, finished=False, state_saved=done.state_saved
        )

    miou, instances = heldout_miou(sam, settings, settings.seed, HELDOUT_SPLIT, settings.eval_scenes, progress)
    if writer is not None:
        writer.add_scalar("sam/heldout_miou", miou, settings.steps)
        writer.close()
    if out is not None:
        results = {"final_loss": done.losses[-1], "heldout_miou": miou, "heldout_instances": instances}
        finish_stage(out, lambda path: save_sam_checkpoint(sam, path), identity, results, control)
    return sam, SAMPretrainResult(done.losses, miou, instances, time.perf_counter() - started)


def _summary_writer(log_dir: str | os.PathLike | None):
    if log_dir is None:
        return None
    from torch.utils.tensorboard import SummaryWriter  # optional dependency, imported only when asked for

    return SummaryWriter(os.fspath(log_dir))
