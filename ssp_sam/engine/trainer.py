"""The SSP-SAM training loop: one process, one GPU or ``torchrun`` DDP, resumable, logged.

Recipe (``../shared/specs/ssp-sam.md``, as the release runs it): frozen CLIP and SAM image
encoders (SAM embeddings read from the on-disk cache), AdamW with two parameter groups (new
modules, SAM mask decoder), the release's per-epoch cosine schedule with linear warm-up
(``optim.py``), gradient clipping, the mask decoder frozen for the first epochs, one random
expression per sample per visit, random letterbox placement.

Configuration: ``configs/train.yaml``, validated once into typed sections before any work
(``train_config.py``; settings accepted but without effect are printed as ``warning:`` lines at the
start). Precision: ``train.precision`` (``precision.py``); the choice and its reason are printed once
at the start. Training and validation read the SAM embeddings the cache holds in the training
precision's storage dtype (bf16 under bf16 training); the final test reads fp32 entries (computed then
if the cache holds others), so its results JSON is fp32 throughout, as ``eval.py precision=fp32``.

The hot loop makes no host synchronisation per step: the loss terms stay on the device and are
read back once every ``train.log_every`` steps (and at the end of an epoch), all steps of that
window in one copy (and one all-reduce under DDP); ``train_log.jsonl`` still gets one line per
step. A NaN or Inf loss is found there, before the epoch's checkpoint is written: the run stops
with a message naming the step and the last good checkpoint stays in ``last/``. SAM's decoder parts
that the mask head never runs are frozen, so DDP needs no search for unused parameters. Data-loader
workers are forked once and persist across epochs (the epoch travels with each index).

Two stages (``train.stage``):

- ``res`` (stage 2): mask and box losses; the best epoch by validation mIoU (gIoU for GRES).
- ``rec`` (stage 1, REC pretraining): box losses only and no SAM at all: no SAM weights are read,
  no embedding cache is filled and SAM's mask decoder never runs (the model's mask head is built
  from no weights only so that the checkpoint has the usual layout). The best epoch by REC
  accuracy on the validation split. Stage 2 started from such a checkpoint (``init_checkpoint``)
  keeps SAM's own mask decoder weights, as the release's stage 2 does.

Run directory layout::

    <run_dir>/last/   model.safetensors, config.json, trainer_state.pt  (every epoch)
    <run_dir>/best/   the best epoch by the validation metric
    <run_dir>/tb/     TensorBoard logs (losses, learning rates, metrics, overlays)
"""

from __future__ import annotations

import math
import shlex
import sys
import time
from dataclasses import dataclass, replace
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from ..backbones.clip_tokenizer import CLIPTokenizer
from ..backbones.sam_frames import MASK_TARGET_BUILDERS
from ..checkpoint import (
    SAM_ENCODER_PREFIX, WEIGHTS_FILE, keys_from_weight_files, load_own_weights, read_checkpoint_config, save_checkpoint,
    sam_encoder_state, stored_sam_encoder_differs, weight_files_of,
)
from ..data.embedding_cache import EmbeddingCache
from ..data.records import ReferringDataset
from ..data.registry import load_splits
from ..data.training import EpochBatchSampler, ReferringTrainingSet, collate, referent_weights
from ..errors import ConfigError, SSPSAMError
from ..feature_cache import ImageTokenCache, TextFeatureCache
from ..image_io import load_image
from ..letterbox import letterbox_image
from ..losses import rec_loss, ssp_sam_loss
from ..metrics import RELEASE_SUFFIX
from ..model import build_model, build_sam_image_encoder
from ..visualize import padded_prediction_overlay
from ..weight_files import read_weights
from ..weight_identity import check_weight_files
from .caching import cache_dtype_for, dataset_image_roots, ensure_cache
from .init_checkpoint import FrozenEncoder, check_init_checkpoint, describe_replaced, describe_resumed, encoders_replaced
from .distributed import barrier, logged_terms, mean_across_ranks, seed_rank_rngs, shutdown_distributed, start_training_process
from .evaluator import evaluate
from .host_memory import default_host_memory_in_worker, shared_with_forked_workers
from .optim import adamw, build_schedule, optimizer_step, parameter_groups
from .rec_validation import REC_METRIC, rec_accuracy
from .reporting import command_line, console_tables, write_results
from .run_dir import append_log, open_run_dir, restore_trainer_state, trainer_state, truncate_log
from .train_config import TrainRunConfig, config_warnings, train_run_config_from

# The validation metric that picks the best checkpoint of stage "res", per task (stage "rec": REC_METRIC);
# with val.protocol=ssp_sam_release its release-arithmetic version (key + RELEASE_SUFFIX), as the release selects.
SELECTION_METRIC = {"res": "mIoU", "gres": "gIoU", "phrasecut": "mIoU"}


def decoder_parts_never_run(decoder: nn.Module) -> list[nn.Module]:
    """The parts of SAM's mask decoder that ``SAMMaskHead`` never runs, so never receive a gradient.

    The head computes mask token 0's mask only: SAM's IoU head and the hypernetwork MLPs of mask
    tokens 1-3 never run. (The IoU token and all four mask tokens are inputs of the two-way
    transformer, so they do get gradients.) The trainer keeps these frozen, so DDP needs no search
    for unused parameters. The release runs all four hypernetwork MLPs and keeps mask 0 afterwards:
    MLPs 1-3 get zero gradients there, and AdamW's weight decay alone shrinks them (about 2e-5
    relative over a run); their outputs are dropped either way, so masks, boxes and losses are the
    same (docs/release_differences.md). The IoU head gets no gradient in the release either.
    """
    return [decoder.iou_prediction_head, *decoder.output_hypernetworks_mlps[1:]]


def epoch_would_overrun(elapsed_seconds: float, longest_epoch_seconds: float, limit_minutes: float) -> bool:
    """Whether an epoch started now, as long as the longest one so far, would end past ``limit_minutes``
    (``train.max_minutes``). Deciding before the epoch, not after it passes the limit, keeps a stage of
    long epochs (a mirrored ShapeWorld epoch is 12-17 minutes here) within its hour."""
    return elapsed_seconds + longest_epoch_seconds > 60 * limit_minutes


class TrainingDivergedError(SSPSAMError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    run_dir: Path
    epochs_run: int
    best_metric: Optional[float]
    last_metrics: dict[str, float]
    losses: list[float]  # the mean training loss of every step of this invocation
    finished: bool = True  # False: stopped by train.max_minutes before the last epoch (resume=true continues)


class Trainer:
    """Owns the model, data, optimizer and logs of one training run.

    ``cfg``: the composed configs/train.yaml (validated here, before any work) or a validated
    :class:`TrainRunConfig`.
    """

    def __init__(self, cfg: DictConfig | TrainRunConfig) -> None:
        # A bad value or run_dir: one line now, not a traceback after the data is read and cached.
        self.config = cfg if isinstance(cfg, TrainRunConfig) else train_run_config_from(cfg)
        config, train = self.config, self.config.train
        self.device, self.precision, self.dist = start_training_process(config.device, train.precision, config.seed)
        if self.dist.is_main:
            for warning in config_warnings(config):
                print(f"warning: {warning}", file=sys.stderr, flush=True)
        self.run_dir = Path(config.run_dir)

        self.stage = train.stage
        self.model_config = config.model
        if self.stage == "rec":  # no SAM weights: the mask head (never run) keeps its random initialisation
            self.model_config = replace(self.model_config, sam_checkpoint=None)
        self.model = build_model(
            self.model_config,
            with_sam_image_encoder=train.save_encoders,
            without_weight_files=("sam",) if self.stage == "rec" else (),
        )
        # Set when the SAM image encoder in the model is not the file's (taken from init_checkpoint, or from the
        # run's own last/): its embeddings are then cached under its own weights, not under the file's.
        self._sam_encoder_from_checkpoint = False
        if config.init_checkpoint:
            self._load_init_checkpoint(config.init_checkpoint)
        self._last = open_run_dir(self.run_dir, config.resume, self.dist, config)  # before the cache: see above
        if self._last is not None:
            self._load_resumed_weights(self._last)
        self.model.to(self.device)

        self.dataset_cfg = config.dataset
        self.datasets = self._read_datasets()
        self.tokenizer = CLIPTokenizer(self.model.clip.context_length, self.model_config.append_period)
        # A frozen text tower's features are computed at a sentence's first visit only. A tower that trains
        # has no run-long cache: it runs at every training step (a cached entry would carry no graph), and
        # each validation fills a cache of its own (evaluate's default), since the weights move in between.
        frozen_text = not self.model_config.finetune_text_encoder
        self.text_cache = (
            TextFeatureCache(max_bytes=int(train.text_cache_gb * 2**30)) if train.text_cache_gb > 0 and frozen_text else None
        )
        self.image_cache = ImageTokenCache(max_bytes=int(train.image_cache_gb * 2**30)) if train.image_cache_gb > 0 else None
        self.train_set = ReferringTrainingSet(
            self.datasets["train"],
            None,  # the SAM embedding cache, given below once every setting has been checked
            self.model.clip.image_size,
            self.model.sam_image_size,
            self.tokenizer,
            seed=config.seed,
            augment=train.augment,
            placements=train.clip_placements,
            need_masks=self.stage == "res",
            expression_weights=train.expression_weights,
            expression_weight_key=train.expression_weight_key,
            mask_frame=MASK_TARGET_BUILDERS[self.model_config.mask_target],
        )
        if train.batch_size > len(self.train_set):
            raise ConfigError(f"train.batch_size={train.batch_size} is larger than the training set ({len(self.train_set)} referents)")
        if train.batch_size % self.dist.world_size:
            raise ConfigError(f"train.batch_size={train.batch_size} is not divisible by the {self.dist.world_size} processes")
        weights = None
        if train.referent_weights:
            weights = referent_weights(self.datasets["train"], train.referent_weights, train.expression_weight_key)
        # The cache fill is the long work before training (hours of ViT-H for RefCOCO): after the checks above
        self.cache = self._prepare_cache() if self.stage == "res" else None
        self.train_set.cache = self.cache
        self.sampler = EpochBatchSampler(
            len(self.train_set), train.batch_size, config.seed, self.dist.rank, self.dist.world_size, weights
        )
        self.loader = DataLoader(
            self.train_set,
            batch_sampler=self.sampler,
            collate_fn=collate,
            num_workers=train.workers,
            persistent_workers=train.workers > 0,  # forked once (see fit); batches carry their epoch
            pin_memory=self.device.type == "cuda",
            worker_init_fn=default_host_memory_in_worker,  # the trainer's kept heap is not for readers
        )
        self.steps_per_epoch = len(self.sampler)
        if train.max_steps_per_epoch is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, train.max_steps_per_epoch)

        self.optimizer = adamw(
            parameter_groups(self.model, train.lr, train.decoder_lr, train.weight_decay, train.text_encoder_lr, train.image_encoder_lr),
            self.device,
        )
        self.scheduler = build_schedule(
            self.optimizer, train.schedule, train.epochs, self.steps_per_epoch, train.warmup_epochs, train.min_lr
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision.needs_grad_scaler)
        self.start_epoch = 0
        self.best_metric: Optional[float] = None
        self.writer = None
        self._ddp: Optional[DistributedDataParallel] = None
        self._ddp_trainable: Optional[tuple[bool, ...]] = None
        if self._last is not None:
            self._restore_trainer_state(self._last)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------------------------ setup

    def _load_init_checkpoint(self, path: str) -> None:
        """Start from the weights of one of our checkpoints.

        A checkpoint of the REC stage holds an untrained mask head (that stage runs no SAM): stage 2
        keeps the mask head of SAM's own weight file instead, as the release's stage 2 starts from
        SAM's decoder (its pretraining never changes it). A model that fine-tunes CLIP's text tower or
        last vision blocks may start from a frozen-CLIP run: they then start from the CLIP weight file.
        The weight files and model settings it was trained with must be the run's
        (:func:`~ssp_sam.engine.init_checkpoint.check_init_checkpoint`).
        """
        stored_config = read_checkpoint_config(path)
        check_init_checkpoint(path, stored_config, self.model_config)
        run = stored_config.get("run") or {}
        from_rec_stage = (run.get("train") or {}).get("stage") == "rec"
        stored = self._check_init_encoders(path)
        sam_head = {k: v.clone() for k, v in self.model.mask_head.state_dict().items()} if from_rec_stage else None
        load_own_weights(self.model, path, finetuned_from_file=True, sam_encoder_checked=True, state=stored)
        if sam_head is not None:
            self.model.mask_head.load_state_dict(sam_head)

    def _check_init_encoders(self, path: str) -> dict[str, Tensor]:
        """Refuse, or take over, frozen encoders the init checkpoint carries that differ from the files'.

        See :mod:`ssp_sam.engine.init_checkpoint`: a run that stores its encoders trains on the
        checkpoint's and caches SAM embeddings under the encoder's own weights; any other run stops.
        Returns the checkpoint's weights (read once, loaded by the caller).
        """
        config = self.model_config
        weights = Path(path) / WEIGHTS_FILE if Path(path).is_dir() else Path(path)
        stored = read_weights(weights, "checkpoint")
        current = self.model.state_dict()
        if config.sam_checkpoint and self.model.sam_image_encoder is None and any(k.startswith(SAM_ENCODER_PREFIX) for k in stored):
            current.update(sam_encoder_state(self.model))  # the file's encoder, which the cache would serve
        encoders = (
            FrozenEncoder(SAM_ENCODER_PREFIX, "SAM image encoder", "model.sam_checkpoint", config.sam_checkpoint, cached=True),
            FrozenEncoder("clip.", "frozen CLIP", "model.clip_checkpoint", config.clip_checkpoint),
        )
        from_files = keys_from_weight_files(self.model, current)
        replaced = encoders_replaced(path, stored, current, from_files, encoders, self.config.train.save_encoders)
        self._sam_encoder_from_checkpoint = any(e.cached for e in replaced)
        if replaced and self.dist.is_main:
            print(describe_replaced(path, replaced), flush=True)
        return stored

    def _read_datasets(self) -> dict[str, ReferringDataset]:
        """The train split, and the val and test splits when the config names them."""
        wanted = {"train": self.config.train.split, "val": self.config.val.split, "test": self.config.test.split}
        wanted = {role: split for role, split in wanted.items() if split}
        splits = load_splits(self.dataset_cfg, list(wanted.values()))
        return {role: splits[split] for role, split in wanted.items()}

    def _prepare_cache(self, images: Optional[list[Path]] = None, dtype: Optional[str] = None) -> EmbeddingCache:
        """Make sure every image (default: of every split) has a cached SAM embedding (each rank computes its share).

        ``dtype``: the entries' dtype (default: the training precision's, ``cache_dtype_for``).
        """
        config = self.model_config
        encoder = self.model.sam_image_encoder
        if encoder is None:  # built only if the cache lacks an image, freed afterwards
            encoder = partial(build_sam_image_encoder, config)
        if images is None:
            images = [p for d in self.datasets.values() for p in d.image_paths()]
        dataset = [f"dataset={self.dataset_cfg.get('name')}"] + [
            f"dataset.{key}={self.dataset_cfg[key]}" for key in ("root", "image_root") if self.dataset_cfg.get(key)
        ]
        return ensure_cache(
            self.config.cache_dir, images, dataset_image_roots(self.dataset_cfg),
            encoder, config.sam_variant, None if self._sam_encoder_from_checkpoint else config.sam_checkpoint,
            self.model.sam_image_size, self.device, self.dist,
            batch_size=self.config.cache_batch_size, dtype=dtype or cache_dtype_for("auto", self.precision),
            sam_custom=config.sam_custom, dataset_arguments=" ".join(shlex.quote(word) for word in dataset),
        )

    def _test_cache(self) -> Optional[EmbeddingCache]:
        """The SAM embeddings the final test reads: fp32 entries, as ``eval.py precision=fp32`` reads them.

        The training cache serves when it holds fp32 entries only (fp32 training); otherwise (bf16 or fp16
        training: entries of any dtype, new ones in the half dtype) the test images' fp32 entries are computed
        (or found) now, so that the results JSON's fp32 is true of the embeddings too.
        """
        if self.cache is None or self.cache.dtype == torch.float32:
            return self.cache
        return self._prepare_cache(self.datasets["test"].image_paths(), dtype="fp32")

    def _load_resumed_weights(self, last: Path) -> None:
        """The weights of the run's ``last/``, before the SAM embedding cache is opened.

        The weight files the run reads its frozen encoders from must hold what it trained with (they may
        have moved: only their contents are compared, :mod:`ssp_sam.weight_identity`).
        A run that stores its encoders keeps the SAM image encoder it trained on even if it is not the
        file's (it started from another model's, or the file changed since, e.g. a pretraining rewrote
        it): its embeddings are then cached under the encoder's own weights, as when the run started.
        """
        config = self.model_config
        check_weight_files(read_checkpoint_config(last).get("weight_files"), weight_files_of(config), last)
        state = read_weights(last / WEIGHTS_FILE, "checkpoint")
        checked = self.model.sam_image_encoder is not None and config.sam_checkpoint is not None
        if checked and stored_sam_encoder_differs(self.model, state):
            self._sam_encoder_from_checkpoint = True
            if self.dist.is_main:
                print(describe_resumed(last, "model.sam_checkpoint", config.sam_checkpoint), flush=True)
        load_own_weights(self.model, last, sam_encoder_checked=checked, state=state)

    def _restore_trainer_state(self, last: Path) -> None:
        """Optimizer, schedule, gradient scaler, RNG and progress from ``last/`` (its weights are loaded already)."""
        state = restore_trainer_state(last, self.optimizer, self.scheduler, self.scaler)
        self.start_epoch = int(state["epoch"]) + 1
        self.best_metric = state.get("best_metric")
        if self.dist.is_main:
            truncate_log(self.run_dir, self.start_epoch, key="epoch")  # the interrupted epoch is trained again

    # ------------------------------------------------------------------------------------ helpers

    def _forward_model(self) -> torch.nn.Module:
        """The model to call for training: wrapped in DDP (re-wrapped when the trainable set changes).

        Every trainable parameter receives a gradient at every step (the decoder parts that never
        run are frozen, see :func:`decoder_parts_never_run`), so DDP does not search for unused ones.
        """
        if not self.dist.enabled:
            return self.model
        trainable = tuple(p.requires_grad for p in self.model.parameters())
        if self._ddp is None or trainable != self._ddp_trainable:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self._ddp = DistributedDataParallel(self.model, device_ids=device_ids)
            self._ddp_trainable = trainable
        return self._ddp

    def _set_decoder_trainable(self, epoch: int) -> None:
        decoder = self.model.mask_head.mask_decoder
        decoder.requires_grad_(self.stage == "res" and epoch >= self.config.train.decoder_freeze_epochs)
        for part in decoder_parts_never_run(decoder):
            part.requires_grad_(False)

    def _log_scalars(self, values: Mapping[str, float], step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def _append_log(self, records: list[Mapping[str, Any]]) -> None:
        if self.dist.is_main:
            append_log(self.run_dir, records)

    def _save(self, name: str, epoch: int, metrics: Mapping[str, float]) -> None:
        if not self.dist.is_main:
            return
        extra = {"run": self.config.to_dict(), "epoch": epoch, "metrics": dict(metrics)}
        save_checkpoint(
            self.model, self.run_dir / name, extra=extra,
            embed_encoders=self.config.train.save_encoders,
            trainer_state=(
                trainer_state(self.optimizer, self.scheduler, self.scaler, epoch=epoch, best_metric=self.best_metric)
                if name == "last" else None
            ),
        )

    # ------------------------------------------------------------------------------------ loop

    def train_one_epoch(self, epoch: int) -> list[float]:
        """Train one epoch; returns the mean training loss of each of its steps (over all ranks)."""
        self.model.train()
        self._set_decoder_trainable(epoch)
        self.sampler.set_epoch(epoch)
        seed_rank_rngs(self.config.seed, epoch, self.dist.rank)
        model = self._forward_model()
        losses: list[float] = []
        window: list[tuple[int, dict[str, float], dict[str, Tensor]]] = []  # (step, its lrs, its loss terms on the device)
        progress = tqdm(
            total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{self.config.train.epochs}", unit="step",
            disable=not self.dist.is_main, dynamic_ncols=True,
        )
        for step, batch in enumerate(islice(self.loader, self.steps_per_epoch)):
            lrs = {f"lr/{group['name']}": group["lr"] for group in self.optimizer.param_groups}  # this step's
            window.append((step, lrs, self._train_step(model, batch)))
            if len(window) == self.config.train.log_every:
                losses += self._log_window(epoch, window, progress)
                window = []
            progress.update(1)
        if window:
            losses += self._log_window(epoch, window, progress)
        progress.close()
        if self.config.train.schedule == "per_epoch":
            self.scheduler.step()  # the next epoch's learning rate, as the release's scheduler.step(epoch + 1)
        return losses

    def _log_window(self, epoch: int, window: list[tuple[int, dict[str, float], dict[str, Tensor]]], progress: tqdm) -> list[float]:
        """Read the loss terms of the window's steps back to the host (the one sync) and log them.

        Returns the steps' losses. Raises TrainingDivergedError at the first step whose loss is not
        finite, before anything of this epoch is saved: ``last/`` keeps the last good checkpoint.
        """
        records = []
        for (step, lrs, _), logged in zip(window, logged_terms([terms for _, _, terms in window], self.dist)):
            if not math.isfinite(logged["train/loss"]):
                self._append_log(records)
                raise TrainingDivergedError(
                    f"the training loss became {logged['train/loss']} at epoch {epoch + 1}, step {step + 1}; "
                    f"the last good checkpoint is kept in {self.run_dir / 'last'}"
                )
            records.append({"epoch": epoch, "step": epoch * self.steps_per_epoch + step, **logged, **lrs})
        self._append_log(records)
        means = {key: float(np.mean([record[key] for record in records])) for key in records[0] if key.startswith("train/")}
        self._log_scalars({**means, **window[-1][1]}, records[-1]["step"])
        progress.set_postfix(loss=f"{means['train/loss']:.4f}")
        return [record["train/loss"] for record in records]

    def _train_step(self, model: torch.nn.Module, batch: dict) -> dict[str, Tensor]:
        """Forward, loss, backward and optimizer step on one batch (and a per-iteration schedule's step).

        Stage "rec" passes no SAM embeddings: the model computes the box only. Nothing here waits
        for the device. Returns the loss terms (0-dim, detached, on the device).
        """
        tokens, clip_pixels = batch["tokens"], batch["clip_pixels"]  # on the CPU: the caches key them without a device sync
        keyed = {"tokens": self.text_cache, "clip_pixels": self.image_cache}  # what a cache encodes from the CPU copy
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if keyed.get(k) is None}
        sam_embedding = batch.get("sam_embedding")
        if sam_embedding is not None:
            sam_embedding = sam_embedding.float()  # stored as fp16/bf16/fp32 in the cache, converted here
        with self.precision.autocast(self.device):
            text = self.text_cache.encode(self.model, tokens) if self.text_cache is not None else batch["tokens"]
            image = self.image_cache.encode(self.model, clip_pixels) if self.image_cache is not None else batch["clip_pixels"]
            output = model(image, text, sam_embedding)
        if self.stage == "rec":
            terms = rec_loss(output.boxes, batch["box"])
        else:
            terms = ssp_sam_loss(output.mask_logits.float(), batch["mask"], output.boxes.float(), batch["box"])
        optimizer_step(terms["loss"], self.model, self.optimizer, self.scaler, self.config.train.grad_clip)
        if self.config.train.schedule == "per_iteration":
            self.scheduler.step()
        return {name: value.detach() for name, value in terms.items()}

    @torch.no_grad()
    def validate(self, epoch: int) -> dict[str, float]:
        if "val" not in self.datasets:
            return {}
        self.model.eval()
        dataset = self.datasets["val"]
        step = (epoch + 1) * self.steps_per_epoch
        val = self.config.val
        if self.stage == "rec":
            metrics = rec_accuracy(self.model, dataset, self.device, self.dist, max_batch=val.max_batch)
            self._log_scalars({f"val/{k}": v for k, v in metrics.items() if isinstance(v, float)}, step)
            return metrics
        result = evaluate(
            self.model, dataset, cache=self.cache, device=self.device, max_batch=val.max_batch,
            progress=self.dist.is_main, protocol=val.protocol, text_cache=self.text_cache, image_cache=self.image_cache,
        )
        self._log_scalars({f"val/{k}": v for k, v in result.metrics.items() if isinstance(v, float)}, step)
        if self.writer is not None and val.overlays > 0:
            self._log_overlays(dataset[: val.overlays], step)
        return result.metrics

    @torch.no_grad()
    def _log_overlays(self, samples: ReferringDataset, step: int) -> None:
        """Predictions for the first sentence of ``samples``, one batched forward, drawn over their images."""
        images = [load_image(sample.image_path) for sample in samples]
        letterboxed = [letterbox_image(image, self.model.clip.image_size) for image in images]
        captions = [sample.expressions[0] for sample in samples]
        clip_pixels = torch.stack([pixels for pixels, _ in letterboxed]).to(self.device)
        embeddings = torch.stack([self.cache.get(sample.image_path) for sample in samples]).to(self.device)
        with self.precision.autocast(self.device):
            output = self.model(clip_pixels, self.tokenizer(captions).to(self.device), embeddings)
        logits, boxes = output.mask_logits[:, 0].float().cpu(), output.boxes.float().cpu()
        for index, (image, (_, letterbox), caption) in enumerate(zip(images, letterboxed, captions)):
            picture = padded_prediction_overlay(
                image, logits[index], boxes[index], letterbox, self.model.sam_image_size, self.model_config.mask_target, caption
            )
            self.writer.add_image(f"val/overlay_{index}", np.asarray(picture), step, dataformats="HWC")

    def _selection_metric(self) -> str:
        if self.stage == "rec":
            return REC_METRIC
        metric = SELECTION_METRIC[self.datasets["train"].task]
        return metric + RELEASE_SUFFIX if self.config.val.protocol == "ssp_sam_release" else metric

    def fit(self) -> TrainResult:
        """Train from ``start_epoch`` to the last epoch, validating every ``val.every`` epochs and after the last.

        With ``train.max_minutes``, stop after an epoch when the next one would end past that much wall
        time of this call, judged by the longest epoch so far (``epoch_would_overrun``; at least one
        epoch runs), so that a stage stays within its limit (``last/`` saved, as after every epoch): the
        result says ``finished=False`` and ``resume=true`` continues with the next epoch, as after a
        kill. The data-loader workers are forked at the first epoch and live until the end (host memory
        trimmed and the garbage collector frozen just before, ``host_memory.py``).
        """
        if self.dist.is_main:
            self.writer = SummaryWriter(str(self.run_dir / "tb"))
        selection = self._selection_metric()
        all_losses: list[float] = []
        last_metrics: dict[str, float] = {}
        epochs = self.config.train.epochs
        session_started = time.time()
        next_epoch = self.start_epoch
        longest_epoch = 0.0
        try:
            with shared_with_forked_workers(enabled=self.loader.num_workers > 0):
                for epoch in range(self.start_epoch, epochs):
                    started = time.time()
                    all_losses += self.train_one_epoch(epoch)
                    validated = (epoch + 1) % self.config.val.every == 0 or epoch + 1 == epochs
                    metrics = self.validate(epoch) if validated else {}
                    last_metrics = metrics or last_metrics
                    # >=: a tie goes to the later epoch, as in the release; an epoch not validated is never best
                    improved = selection in metrics and (self.best_metric is None or metrics[selection] >= self.best_metric)
                    if improved:
                        self.best_metric = metrics[selection]
                    # best/ first: a run killed between the two saves resumes from the previous last/ and
                    # redoes this epoch, where last/ first would leave best/ older than last/'s best_metric.
                    if improved or "val" not in self.datasets:
                        self._save("best", epoch, metrics)
                    self._save("last", epoch, metrics)
                    barrier(self.dist)
                    if self.dist.is_main:
                        shown = f", val {selection} {metrics[selection]:.4f}" if selection in metrics else ""
                        mean_loss = float(np.mean(all_losses[-self.steps_per_epoch :])) if all_losses else math.nan
                        tqdm.write(f"epoch {epoch + 1}/{epochs}: loss {mean_loss:.4f}{shown} ({time.time() - started:.0f}s)")
                    next_epoch = epoch + 1
                    longest_epoch = max(longest_epoch, time.time() - started)
                    if next_epoch < epochs and self._time_is_up(session_started, longest_epoch):
                        break
        finally:
            if self.writer is not None:
                self.writer.close()
        return TrainResult(
            self.run_dir, next_epoch - self.start_epoch, self.best_metric, last_metrics, all_losses, finished=next_epoch >= epochs
        )

    def _time_is_up(self, session_started: float, longest_epoch: float) -> bool:
        """Whether another epoch would end past ``train.max_minutes`` of wall time since ``session_started``.
        The ranks' mean elapsed time and longest epoch decide, so that every rank stops after the same epoch."""
        limit = self.config.train.max_minutes
        if limit is None:
            return False
        times = torch.tensor([time.time() - session_started, longest_epoch], device=self.device)
        elapsed, longest = mean_across_ranks(times, self.dist).tolist()
        return epoch_would_overrun(elapsed, longest, limit)

    def test(self) -> Optional[Path]:
        """Evaluate the best checkpoint on ``test.split`` and write the results JSON into the run directory.

        Masks are compared as validation compares them (``val.protocol``: the release's evaluator by
        default, as the tables the recipe reproduces), in fp32, on fp32 SAM embeddings (:meth:`_test_cache`).
        Returns the JSON's path (None without a test split, and on ranks other than 0).
        """
        if "test" not in self.datasets:
            return None
        load_own_weights(self.model, self.run_dir / "best", sam_encoder_checked=self._sam_encoder_from_checkpoint)
        self.model.eval()
        dataset = self.datasets["test"]
        result = evaluate(
            self.model, dataset, cache=self._test_cache(), device=self.device, max_batch=self.config.val.max_batch,
            progress=self.dist.is_main, protocol=self.config.val.protocol,
        )
        if not self.dist.is_main:
            return None
        path = self.run_dir / f"results_{dataset.name}_{dataset.split}.json"
        write_results(
            path, result, {**self.dataset_cfg, "split": dataset.split}, self.model_config.name, self.run_dir / "best", command_line(),
            label=self.config.name, cache_dtype="fp32",  # _test_cache: fp32 entries only
        )
        tqdm.write(f"{dataset.name} {dataset.split}:\n{console_tables(result)}\nwrote {path}")
        return path


def train(cfg: DictConfig) -> TrainResult:
    """Train as ``cfg`` says (see configs/train.yaml), then, if all epochs are done, evaluate on the test
    split if one is named."""
    try:
        trainer = Trainer(cfg)
        result = trainer.fit()
        if result.finished:
            trainer.test()
        return result
    finally:
        shutdown_distributed()
