"""The OVSS training loop (CAT-Seg, CAT-Seg + SAM vote, SAM-MI): one process or ``torchrun`` DDP, resumable.

Recipe: ``train_config.py`` (CAT-Seg's by default). Per iteration: the training vocabulary's class
embeddings (CLIP's text tower trains its q/v, so they are recomputed every step, as CAT-Seg does), the
model on a batch of crops, its loss (CAT-Seg's per-class BCE, + TSPP's for SAM-MI), AdamW, gradient
clipping over the whole model, the cosine schedule stepped once per iteration. SAM is frozen; SAM-MI
runs it on every crop (its image embedding computed once per crop and shared by TSPP's proposals and
DMI), or reads the embedding from the cache (``cache_dir`` with ``train.crop=none``: of the whole image resized).

As the SSP-SAM trainer (``ssp_sam/engine/trainer.py``): the loss terms stay on the device and are read
back once per ``train.log_every`` steps (a NaN/Inf stops the run before anything of that window is
saved); ``train_log.jsonl`` gets one line per step; items are pure functions of (seed, epoch, index)
and ``last/`` holds model, optimizer, schedule, gradient scaler, RNG and iteration, so ``resume=true``
replays an uninterrupted run bit for bit; N processes see the same global batches as one.
``train.max_minutes`` stops at an iteration boundary with ``last/`` saved (``finished=False``; the
script exits with status 3).

Run directory::

    <run_dir>/last/   model.safetensors, config.json, trainer_state.pt   (every train.save_every iterations, at a stop, at the end)
    <run_dir>/best/   the best validation (val.metric), or the final state without validation
    <run_dir>/tb/     TensorBoard scalars (losses, learning rates, validation metrics)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
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

from ...data.embedding_cache import EmbeddingCache
from ...data.training import collate
from ...engine.caching import cache_dtype_for, ensure_cache
from ...engine.init_checkpoint import FrozenEncoder, describe_replaced, describe_resumed, encoders_replaced
from ...engine.distributed import barrier, logged_terms, mean_across_ranks, seed_rank_rngs, shutdown_distributed, start_training_process
from ...engine.host_memory import default_host_memory_in_worker, shared_with_forked_workers
from ...engine.optim import adamw, cosine_schedule, optimizer_step
from ...engine.run_dir import append_log, open_run_dir, restore_trainer_state, trainer_state, truncate_log
from ...engine.trainer import TrainingDivergedError
from ...errors import ConfigError
from ...state_dicts import differs_under
from ...weight_identity import check_weight_files
from ..build import build_ovss_model
from ..data import IGNORE_INDEX, load_ovss_dataset
from ..data.dataset import SemSegDataset
from ..model import OVSSModel
from .checkpoint import (
    CATSEG_BASES, SAM_ENCODER_PREFIX, SAM_PREFIX, frozen_from_files, load_ovss_weights, read_ovss_checkpoint_config,
    read_ovss_weights, sam_mi_start_from_catseg, save_ovss_checkpoint, weight_files_of,
)
from .data import IterationBatchSampler, TrainingCrops
from .evaluator import evaluate_ovss
from .train_config import ZERO_SHOT_METRICS, OVSSTrainRunConfig, ovss_train_config_from

# Iterations of one invocation (a stage) in which SAM must keep at least one mask (OVSSTrainer._check_proposals).
PROPOSAL_CHECK_ITERATIONS = 100
NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm2d)


def parameter_groups(model: OVSSModel, lr: float, clip_multiplier: float, weight_decay: float, norm_weight_decay: float) -> list[dict]:
    """AdamW groups as CAT-Seg's ``build_optimizer``: CLIP's trained weights at ``lr * clip_multiplier``; norm
    layers' parameters and Swin's relative-position tables at ``norm_weight_decay`` (CAT-Seg: both 0); the
    rest at ``lr`` and ``weight_decay``. Frozen parameters (SAM, CLIP's other weights) are left out."""
    groups: dict[str, dict] = {
        "clip": {"name": "clip", "params": [], "lr": lr * clip_multiplier, "weight_decay": weight_decay},
        "no_decay": {"name": "no_decay", "params": [], "lr": lr, "weight_decay": norm_weight_decay},
        "new_modules": {"name": "new_modules", "params": [], "lr": lr, "weight_decay": weight_decay},
    }
    for module_name, module in model.named_modules():
        for name, parameter in module.named_parameters(recurse=False):
            if not parameter.requires_grad:
                continue
            if module_name.startswith("catseg.clip."):
                groups["clip"]["params"].append(parameter)
            elif isinstance(module, NORM_TYPES) or "relative_position_bias_table" in name:
                groups["no_decay"]["params"].append(parameter)
            else:
                groups["new_modules"]["params"].append(parameter)
    return [group for group in groups.values() if group["params"]]


def parameters_never_used(model: OVSSModel, num_classes: int) -> list[nn.Parameter]:
    """Trainable parameters that no training step of a ``num_classes`` vocabulary uses, so never get a gradient.

    Class aggregation pads the aggregated classes (min(T, max_classes)) with a learned token up to
    ``max_classes``; a vocabulary of at least ``max_classes`` classes leaves no padding, so the token and
    its guidance vector never run. (CLIP's unused q of its last image block is frozen by CATSegCLIP.)
    The trainer freezes these: AdamW skipped them anyway (no gradient), and DDP then needs no search
    for unused parameters.
    """
    if num_classes < model.catseg.max_classes:
        return []
    return [
        parameter
        for layer in model.catseg.layers
        if layer.classes.pad_to
        for parameter in (layer.classes.padding_token, layer.classes.padding_guidance)
    ]


class _LossOfBatch(nn.Module):
    """Class embeddings, forward and loss in one module call, so DDP sees every trained weight (CLIP's text too)."""

    def __init__(self, model: OVSSModel, class_names: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.class_names = class_names

    def forward(self, images: Tensor, labels: Tensor, sam_embeddings: Optional[Tensor]) -> dict[str, Tensor]:
        text = self.model.encode_classes(self.class_names)
        output = self.model(images, text, sam_embeddings)
        terms = self.model.loss(output, labels, ignore_index=IGNORE_INDEX)
        if output.proposals is not None:  # logged as train/sam_masks; checked by OVSSTrainer._check_proposals
            terms["sam_masks"] = output.proposals.valid.sum(dim=1).float().mean()
        return terms


@dataclass
class OVSSTrainResult:
    run_dir: Path
    iterations_run: int  # in this invocation
    iteration: int  # completed iterations in all
    finished: bool  # False: stopped by train.max_minutes, last/ saved for resume=true
    best_metric: Optional[float]
    losses: list[float]  # the training loss of every step of this invocation


class OVSSTrainer:
    """One OVSS training run. ``cfg``: a composed configs/train_ovss.yaml or a validated :class:`OVSSTrainRunConfig`."""

    def __init__(self, cfg: DictConfig | OVSSTrainRunConfig) -> None:
        self.config = cfg if isinstance(cfg, OVSSTrainRunConfig) else ovss_train_config_from(cfg)
        config, train = self.config, self.config.train
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self.device, self.precision, self.dist = start_training_process(config.device, train.precision, config.seed)
        self.run_dir = Path(config.run_dir)

        self.train_set = self._dataset(train.split)
        self.dataset_class_names = self.train_set.class_names  # stored: what predict.py segments into by default
        if train.vocabulary == "seen" and self.train_set.unseen_classes:
            self.train_set = self.train_set.without_unseen()
            if self.dist.is_main:
                print(f"training vocabulary: the {len(self.train_set.class_names)} seen class names "
                      f"(the list's unseen ones left out: train.vocabulary=seen)", flush=True)
        self.val_set = self._dataset(config.val.split) if config.val.split else None
        if self.val_set is not None and config.val.metric in ZERO_SHOT_METRICS and not self.val_set.unseen_classes:
            raise ConfigError(f"val.metric={config.val.metric}: the validation split {config.val.split} names no unseen classes")
        # Inductive: validation, which picks best/, sees the seen vocabulary only, with the unseen classes'
        # pixels not scored. Scored with all names, a seen class's IoU would also count the unseen objects
        # labelled with it (and its pixels labelled with an unseen name), so selection would reward telling
        # unseen objects apart using their ground truth. Its "mIoU seen" is then this mIoU.
        self._val_seen_only = train.vocabulary == "seen" and self.val_set is not None and bool(self.val_set.unseen_classes)
        if self._val_seen_only:
            if config.val.metric in ("mIoU unseen", "hIoU"):
                raise ConfigError(
                    f"val.metric={config.val.metric}: with train.vocabulary=seen (inductive) validation scores the seen "
                    f"classes only; choose best/ by 'mIoU seen' (or train.vocabulary=all for the transductive setting)"
                )
            self.val_set = self.val_set.without_unseen()
        self._check_unseen_in_validation()
        self.class_names = self.train_set.class_names
        if train.batch_size % self.dist.world_size:
            raise ConfigError(f"train.batch_size={train.batch_size} is not divisible by the {self.dist.world_size} processes")
        if train.batch_size > len(self.train_set):
            raise ConfigError(f"train.batch_size={train.batch_size} is larger than the training set ({len(self.train_set)} images)")

        self.model = build_ovss_model(config.ovss_model)
        # Set when the SAM image encoder in the model is not the file's (taken from init_checkpoint, or from the
        # run's own last/): its embeddings are then cached under its own weights, not under the file's.
        self._sam_encoder_from_checkpoint = False
        if config.init_checkpoint:
            stored = self._check_init_encoders(config.init_checkpoint)
            if self._starts_sam_mi_from_catseg(config.init_checkpoint):
                stored = sam_mi_start_from_catseg(stored, self.model)
            load_ovss_weights(self.model, config.init_checkpoint, sam_encoder_checked=True, state=stored)
        self._last = open_run_dir(self.run_dir, config.resume, self.dist, config)  # before the caches: see above
        if self._last is not None:
            self._load_resumed_weights(self._last)
        for parameter in parameters_never_used(self.model, len(self.class_names)):
            parameter.requires_grad_(False)
        self.model.to(self.device)
        self.train_cache, self.val_cache = self._prepare_caches()

        self.optimizer = adamw(
            parameter_groups(self.model, train.lr, train.clip_lr_multiplier, train.weight_decay, train.norm_weight_decay),
            self.device,
        )
        self.scheduler = cosine_schedule(self.optimizer, train.iterations, train.warmup_iterations, train.min_lr)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision.needs_grad_scaler)
        self.iteration = 0
        self.best_metric: Optional[float] = None
        self._proposals_checked = False
        self._proposal_check_from = 0
        self.writer: Optional[SummaryWriter] = None
        if self._last is not None:
            self._restore_trainer_state(self._last)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)

        self.sampler = IterationBatchSampler(
            len(self.train_set), train.batch_size, config.seed, train.iterations, self.iteration, self.dist.rank, self.dist.world_size
        )
        crops = TrainingCrops(
            self.train_set, self.model.image_size, train.crop, train.short_side, train.max_size, train.flip, config.seed, self.train_cache
        )
        self.loader = DataLoader(
            crops, batch_sampler=self.sampler, collate_fn=collate, num_workers=train.workers,
            persistent_workers=train.workers > 0, pin_memory=self.device.type == "cuda",
            worker_init_fn=default_host_memory_in_worker,  # the trainer's kept heap is not for readers
        )
        loss_of_batch = _LossOfBatch(self.model, self.class_names)
        # Every trainable parameter gets a gradient at every step (see parameters_never_used).
        self.forward = (
            DistributedDataParallel(loss_of_batch, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if self.dist.enabled else loss_of_batch
        )

    # ------------------------------------------------------------------------------------ setup

    def _dataset(self, split: str) -> SemSegDataset:
        return load_ovss_dataset(self.config.dataset_config(split))

    def _check_unseen_in_validation(self) -> None:
        """A ``val.metric`` of the unseen classes needs unseen pixels among the validated images: checked on their
        label maps now, not at the first validation (which runs before that iteration's save)."""
        val = self.config.val
        if self.val_set is None or val.metric not in ("mIoU unseen", "hIoU"):
            return
        unseen = np.asarray(self.val_set.unseen_indices)
        images = len(self.val_set) if val.max_images is None else min(val.max_images, len(self.val_set))
        if not any(np.isin(self.val_set.read_label(index), unseen).any() for index in range(images)):
            raise ConfigError(
                f"val.metric={val.metric}: none of the {images} validated images of {val.split} shows an unseen class "
                f"({', '.join(self.val_set.unseen_classes)}); choose another metric or more val.max_images"
            )

    def _starts_sam_mi_from_catseg(self, path: str) -> bool:
        """True (and said) when this SAM-MI run starts from a CAT-Seg checkpoint (:func:`sam_mi_start_from_catseg`)."""
        base = read_ovss_checkpoint_config(path)["ovss_model"].get("variant")
        if self.config.ovss_model.variant != "sam_mi" or base not in CATSEG_BASES:
            return False
        if self.dist.is_main:
            print(
                f"init_checkpoint={path}: a {base} checkpoint; SAM-MI's own parts (DMI, TSPP) start as initialised, "
                "so training starts from that CAT-Seg's predictions",
                flush=True,
            )
        return True

    def _check_init_encoders(self, path: str) -> dict[str, Tensor]:
        """Refuse, or take over, frozen encoders the init checkpoint carries that differ from the files'.

        See :mod:`ssp_sam.engine.init_checkpoint`: a run that stores its encoders trains on the
        checkpoint's and caches SAM embeddings under the encoder's own weights; any other run stops.
        Returns the checkpoint's weights (read once, loaded by the caller).
        """
        sam, clip = self.config.ovss_model.sam, self.config.ovss_model.clip
        encoders = (
            FrozenEncoder(SAM_ENCODER_PREFIX, "SAM image encoder", "ovss_model.sam.checkpoint", sam.checkpoint, cached=True),
            FrozenEncoder(
                (SAM_PREFIX + "prompt_encoder.", SAM_PREFIX + "mask_decoder."), "SAM prompt encoder and mask decoder",
                "ovss_model.sam.checkpoint", sam.checkpoint,
            ),
            FrozenEncoder("catseg.clip.", "frozen CLIP", "ovss_model.clip.checkpoint", clip.checkpoint),
        )
        stored = read_ovss_weights(path)
        replaced = encoders_replaced(
            path, stored, self.model.state_dict(), frozen_from_files(self.model, self.config.ovss_model), encoders,
            self.config.train.save_encoders,
        )
        self._sam_encoder_from_checkpoint = any(e.cached for e in replaced)
        if replaced and self.dist.is_main:
            print(describe_replaced(path, replaced), flush=True)
        return stored

    def _prepare_caches(self) -> tuple[EmbeddingCache | None, EmbeddingCache | None]:
        """The SAM embedding cache for training (SAM-MI, whole images) and validation (SAM variants, no sliding window)."""
        config = self.config
        model_config = config.ovss_model
        for_train = model_config.variant == "sam_mi"
        for_val = self.val_set is not None and model_config.uses_sam and not config.eval.sliding_window
        if config.cache_dir is None or not (for_train or for_val):
            return None, None
        if for_train and config.train.crop != "none":
            raise ConfigError(
                "cache_dir: cached SAM embeddings are of whole images and cannot serve random crops; "
                "set train.crop=none or cache_dir=null"
            )
        images = [sample.image_path for sample in self.train_set.samples] if for_train else []
        if for_val:
            images += [sample.image_path for sample in self.val_set.samples[: config.val.max_images]]
        proposer = self.model.proposer
        cache = ensure_cache(
            config.cache_dir, images, [Path(str(config.dataset_config(config.train.split)["root"]))], proposer.image_encoder, model_config.sam.variant,
            None if self._sam_encoder_from_checkpoint else model_config.sam.checkpoint, proposer.sam_size, self.device, self.dist,
            config.cache_batch_size, cache_dtype_for("auto", self.precision), model_input_size=self.model.image_size,
        )
        return (cache if for_train else None), (cache if for_val else None)

    def _load_resumed_weights(self, last: Path) -> None:
        """The weights of the run's ``last/``, before the SAM embedding caches are opened.

        The weight files the run reads its frozen encoders from must hold what it trained with (moved is
        fine: contents are compared, :mod:`ssp_sam.weight_identity`). A run that stored its encoders keeps
        the SAM image encoder it trained on even if it is not the file's (it started from another model's):
        its embeddings are then cached under the encoder's own weights, as when the run started.
        """
        check_weight_files(read_ovss_checkpoint_config(last).get("weight_files"), weight_files_of(self.config.ovss_model), last)
        sam_file = self.config.ovss_model.sam.checkpoint
        state = read_ovss_weights(last)
        if sam_file is not None and differs_under(state, self.model.state_dict(), SAM_ENCODER_PREFIX):
            self._sam_encoder_from_checkpoint = True
            if self.dist.is_main:
                print(describe_resumed(last, "ovss_model.sam.checkpoint", sam_file), flush=True)
        load_ovss_weights(self.model, last, sam_encoder_checked=True, state=state)

    def _restore_trainer_state(self, last: Path) -> None:
        """Optimizer, schedule, gradient scaler, RNG and progress from ``last/`` (its weights are loaded already)."""
        state = restore_trainer_state(last, self.optimizer, self.scheduler, self.scaler)
        self.iteration = int(state["iteration"])
        self.best_metric = state.get("best_metric")
        if self.dist.is_main:
            truncate_log(self.run_dir, self.iteration, key="iteration")  # the iterations after the state are trained again

    # ------------------------------------------------------------------------------------ steps

    def _time_is_up(self, started: float) -> bool:
        """Whether ``train.max_minutes`` of wall time have passed since ``started``, on the ranks' mean clock."""
        limit = self.config.train.max_minutes
        if limit is None:
            return False
        elapsed = mean_across_ranks(torch.tensor([time.monotonic() - started], device=self.device), self.dist)
        return float(elapsed) >= 60 * limit

    def _train_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Forward, loss, backward, clipping, optimizer and schedule step. No host sync; returns the detached loss terms."""
        self.model.train()
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        embeddings = batch.get("sam_embedding")
        with self.precision.autocast(self.device):
            terms = self.forward(batch["image"], batch["label"], embeddings.float() if embeddings is not None else None)
        optimizer_step(terms["loss"], self.model, self.optimizer, self.scaler, self.config.train.grad_clip)
        self.scheduler.step()
        return {name: value.detach().float() for name, value in terms.items()}

    def _log_window(self, window: list[tuple[int, dict[str, float], dict[str, Tensor]]], progress: tqdm) -> list[float]:
        """Read a window's loss terms back (the one sync), log them; raise at the first non-finite loss."""
        records = []
        for (iteration, lrs, _), logged in zip(window, logged_terms([terms for _, _, terms in window], self.dist)):
            if not math.isfinite(logged["train/loss"]):
                self._append_log(records)
                raise TrainingDivergedError(
                    f"the training loss became {logged['train/loss']} at iteration {iteration + 1}; "
                    f"the last good checkpoint is kept in {self.run_dir / 'last'}"
                )
            records.append({"iteration": iteration, **logged, **lrs})
        self._append_log(records)
        self._check_proposals(records)
        if self.writer is not None:
            means = {key: float(np.mean([r[key] for r in records])) for key in records[0] if key.startswith("train/")}
            for key, value in {**means, **window[-1][1]}.items():
                self.writer.add_scalar(key, value, records[-1]["iteration"])
        progress.set_postfix(loss=f"{records[-1]['train/loss']:.4f}")
        return [record["train/loss"] for record in records]

    def _check_proposals(self, records: list[Mapping[str, Any]]) -> None:
        """Stop when SAM kept no mask for any image in this invocation's first ``PROPOSAL_CHECK_ITERATIONS``
        iterations (or all it has left to run): the masks are what SAM-MI adds to CAT-Seg, and without them
        it would train (and report) CAT-Seg under its name. (The ShapeWorld SAM's pretraining trains its
        single-mask output only; its three multimask outputs give flat logits that no filter keeps.) One
        logged window is too short to judge: the ShapeWorld SAM-MI keeps 0.1-1.5 masks per scene, and a
        resumed stage's first window can be a few iterations long."""
        if self._proposals_checked or "train/sam_masks" not in records[0]:
            return
        if any(record["train/sam_masks"] > 0 for record in records):
            self._proposals_checked = True
            return
        first = self._proposal_check_from
        if records[-1]["iteration"] + 1 - first < min(PROPOSAL_CHECK_ITERATIONS, self.config.train.iterations - first):
            return
        proposals = self.config.ovss_model.proposals
        raise ConfigError(
            f"ovss_model.proposals: SAM kept no mask in iterations {first + 1}-{records[-1]['iteration'] + 1} "
            f"(multimask_output={proposals.multimask_output}, pred_iou_thresh={proposals.pred_iou_thresh}, "
            f"stability_score_thresh={proposals.stability_score_thresh}); a SAM trained with single-mask output only "
            "needs multimask_output=false"
        )

    def _append_log(self, records: list[Mapping[str, Any]]) -> None:
        if self.dist.is_main:
            append_log(self.run_dir, records)

    def _save(self, name: str, metrics: Mapping[str, float]) -> None:
        if not self.dist.is_main:
            return
        state = None
        if name == "last":
            state = trainer_state(self.optimizer, self.scheduler, self.scaler, iteration=self.iteration, best_metric=self.best_metric)
        extra = {
            "run": self.config.to_dict(), "iteration": self.iteration, "metrics": dict(metrics),
            "dataset_class_names": list(self.dataset_class_names),
        }
        save_ovss_checkpoint(
            self.model, self.run_dir / name, self.class_names, extra, embed_encoders=self.config.train.save_encoders, trainer_state=state
        )

    def validate(self) -> dict[str, float]:
        """Score the validation split; save best/ when ``val.metric`` is at least the best so far."""
        if self.val_set is None:
            return {}
        result = evaluate_ovss(
            self.model, self.val_set, self.config.eval, self.device, self.precision, self.val_cache, self.dist,
            progress=self.dist.is_main, max_images=self.config.val.max_images, workers=min(self.config.train.workers, 2),
        )
        metrics = result.metrics
        if self._val_seen_only:  # the seen vocabulary on the seen classes' pixels: all of it is "seen"
            metrics["mIoU seen"] = metrics["mIoU"]
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(f"val/{key}", value, self.iteration)
        metric = self.config.val.metric
        if metric not in metrics:
            raise ConfigError(f"val.metric={metric}: the validation split gives only {', '.join(metrics)}")
        if self.best_metric is None or metrics[metric] >= self.best_metric:
            self.best_metric = metrics[metric]
            self._save("best", metrics)
        if self.dist.is_main:
            tqdm.write(f"iteration {self.iteration}: val {metric} {metrics[metric]:.4f} (best {self.best_metric:.4f})")
        return metrics

    # ------------------------------------------------------------------------------------ loop

    def fit(self) -> OVSSTrainResult:
        """Train from the current iteration to ``train.iterations`` (or until ``train.max_minutes``)."""
        train = self.config.train
        started, start_iteration = time.monotonic(), self.iteration
        self._proposal_check_from = start_iteration
        losses: list[float] = []
        window: list[tuple[int, dict[str, float], dict[str, Tensor]]] = []
        finished = True
        if self.dist.is_main:
            self.writer = SummaryWriter(str(self.run_dir / "tb"))
        progress = tqdm(
            total=train.iterations, initial=self.iteration, desc="ovss train", unit="it", disable=not self.dist.is_main, dynamic_ncols=True
        )
        metrics: dict[str, float] = {}
        try:
            with shared_with_forked_workers(enabled=self.loader.num_workers > 0):
                for batch in self.loader:
                    lrs = {f"lr/{group['name']}": group["lr"] for group in self.optimizer.param_groups}
                    seed_rank_rngs(self.config.seed, self.iteration, self.dist.rank)
                    window.append((self.iteration, lrs, self._train_step(batch)))
                    self.iteration += 1
                    progress.update(1)
                    done = self.iteration == train.iterations
                    validate = self.val_set is not None and (self.iteration % self.config.val.every == 0 or done)
                    save = self.iteration % train.save_every == 0 or done
                    # The clock is read where every rank is at the same iteration anyway (a full log window, a
                    # validation or a save) and decided on the ranks' mean, so that all ranks stop together.
                    out_of_time = (len(window) == train.log_every or validate or save) and not done and self._time_is_up(started)
                    save = save or out_of_time
                    if len(window) == train.log_every or validate or save:
                        losses += self._log_window(window, progress)  # before anything of the window is saved
                        window = []
                    if validate:
                        metrics = self.validate()
                    if save:
                        self._save("last", metrics)
                        barrier(self.dist)
                    if out_of_time and not done:
                        finished = False
                        break
            if finished and self.val_set is None:
                self._save("best", metrics)
        finally:
            progress.close()
            if self.writer is not None:
                self.writer.close()
        return OVSSTrainResult(self.run_dir, self.iteration - start_iteration, self.iteration, finished, self.best_metric, losses)


def train_ovss(cfg: DictConfig | OVSSTrainRunConfig) -> OVSSTrainResult:
    """Train as ``cfg`` says (configs/train_ovss.yaml)."""
    try:
        return OVSSTrainer(cfg).fit()
    finally:
        shutdown_distributed()
