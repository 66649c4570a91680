"""The OVSS training loop (CAT-Seg, CAT-Seg + SAM vote, SAM-MI): one process or ``torchrun`` DDP, resumable.

Recipe: ``train_config.py`` (CAT-Seg's by default). Per iteration: the training vocabulary's class
embeddings (CLIP's text tower trains its q/v, so they are recomputed every step, as CAT-Seg does), the
model on a batch of crops, its loss (CAT-Seg's per-class BCE, + TSPP's for SAM-MI), AdamW, gradient
clipping over the whole model, the cosine schedule stepped once per iteration. SAM is frozen; SAM-MI
runs it on every crop (its image embedding computed once per crop and shared by TSPP's proposals and
DMI), or reads the embedding from the cache (``cache_dir`` with ``train.crop=none``: whole square images).

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

import json
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
from ...engine.caching import ensure_cache
from ...engine.distributed import DistInfo, barrier, init_distributed, mean_across_ranks, shutdown_distributed
from ...engine.host_memory import keep_freed_host_memory, shared_with_forked_workers
from ...engine.optim import cosine_schedule
from ...engine.precision import resolve_precision
from ...engine.run_dir import recover_run_dir
from ...engine.trainer import TrainingDivergedError
from ...errors import ConfigError
from ...fileio import atomic_path
from ...predictor import resolve_device
from ..build import build_ovss_model
from ..data import IGNORE_INDEX, load_ovss_dataset
from ..data.dataset import SemSegDataset
from ..model import OVSSModel
from .checkpoint import load_ovss_weights, read_ovss_trainer_state, save_ovss_checkpoint
from .data import IterationBatchSampler, TrainingCrops, collate_crops
from .evaluator import evaluate_ovss
from .train_config import OVSSTrainRunConfig, ovss_train_config_from

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
        return self.model.loss(output, labels, ignore_index=IGNORE_INDEX)


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
        self.device = resolve_device(config.device)
        self.precision = resolve_precision(train.precision, self.device, key="train.precision")
        self.dist: DistInfo = init_distributed(self.device)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        else:
            keep_freed_host_memory()
        if self.dist.is_main:
            tqdm.write(f"precision: {self.precision.name} ({self.precision.reason})")
        self.run_dir = Path(config.run_dir)
        torch.manual_seed(config.seed)
        np.random.seed(config.seed % 2**32)

        self.train_set = self._dataset(train.split)
        self.val_set = self._dataset(config.val.split) if config.val.split else None
        self.class_names = self.train_set.class_names
        if train.batch_size % self.dist.world_size:
            raise ConfigError(f"train.batch_size={train.batch_size} is not divisible by the {self.dist.world_size} processes")
        if train.batch_size > len(self.train_set):
            raise ConfigError(f"train.batch_size={train.batch_size} is larger than the training set ({len(self.train_set)} images)")

        self.model = build_ovss_model(config.ovss_model)
        if config.init_checkpoint:
            load_ovss_weights(self.model, config.init_checkpoint)
        for parameter in parameters_never_used(self.model, len(self.class_names)):
            parameter.requires_grad_(False)
        self.model.to(self.device)
        self.train_cache, self.val_cache = self._prepare_caches()

        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.model, train.lr, train.clip_lr_multiplier, train.weight_decay, train.norm_weight_decay),
            fused=self.precision.needs_grad_scaler or None,
        )
        self.scheduler = cosine_schedule(self.optimizer, train.iterations, train.warmup_iterations, train.min_lr)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision.needs_grad_scaler)
        self.iteration = 0
        self.best_metric: Optional[float] = None
        self.writer: Optional[SummaryWriter] = None
        self._resume_or_check_run_dir()
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)

        self.sampler = IterationBatchSampler(
            len(self.train_set), train.batch_size, config.seed, train.iterations, self.iteration, self.dist.rank, self.dist.world_size
        )
        crops = TrainingCrops(
            self.train_set, self.model.image_size, train.crop, train.short_side, train.max_size, train.flip, config.seed, self.train_cache
        )
        self.loader = DataLoader(
            crops, batch_sampler=self.sampler, collate_fn=collate_crops, num_workers=train.workers,
            persistent_workers=train.workers > 0, pin_memory=self.device.type == "cuda",
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
            model_config.sam.checkpoint, proposer.sam_size, self.device, self.dist, config.cache_batch_size,
        )
        return (cache if for_train else None), (cache if for_val else None)

    def _resume_or_check_run_dir(self) -> None:
        if self.dist.is_main:
            recover_run_dir(self.run_dir)
        barrier(self.dist)
        last = self.run_dir / "last"
        if last.exists() and not self.config.resume:
            raise ConfigError(f"run_dir={self.run_dir} already holds a run; pass resume=true to continue it or choose another run_dir")
        if not self.config.resume:
            self._truncate_log(0)
            return
        if not last.exists():
            raise ConfigError(f"resume=true but {last} does not exist (nothing to resume)")
        load_ovss_weights(self.model, last)
        state = read_ovss_trainer_state(last)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        self.iteration = int(state["iteration"])
        self.best_metric = state.get("best_metric")
        self._truncate_log(self.iteration)

    def _truncate_log(self, iteration: int) -> None:
        """Drop the log lines of iterations after the state resumed from (they are trained again)."""
        log = self.run_dir / "train_log.jsonl"
        if not self.dist.is_main or not log.exists():
            return
        kept = []
        for line in log.read_text().splitlines():
            try:
                if json.loads(line)["iteration"] < iteration:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
        with atomic_path(log) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept))

    # ------------------------------------------------------------------------------------ steps

    def _train_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Forward, loss, backward, clipping, optimizer and schedule step. No host sync; returns the detached loss terms."""
        self.model.train()
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        embeddings = batch.get("sam_embedding")
        with self.precision.autocast(self.device):
            terms = self.forward(batch["image"], batch["label"], embeddings.float() if embeddings is not None else None)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(terms["loss"]).backward()
        self.scaler.unscale_(self.optimizer)
        if self.config.train.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.config.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return {name: value.detach().float() for name, value in terms.items()}

    def _log_window(self, window: list[tuple[int, dict[str, float], dict[str, Tensor]]], progress: tqdm) -> list[float]:
        """Read a window's loss terms back (the one sync), log them; raise at the first non-finite loss."""
        names = sorted(window[0][2])
        rows = mean_across_ranks(torch.stack([torch.stack([t[n] for n in names]) for _, _, t in window]), self.dist).tolist()
        records = []
        for (iteration, lrs, _), row in zip(window, rows):
            logged = {f"train/{name}": value for name, value in zip(names, row)}
            if not math.isfinite(logged["train/loss"]):
                self._append_log(records)
                raise TrainingDivergedError(
                    f"the training loss became {logged['train/loss']} at iteration {iteration + 1}; "
                    f"the last good checkpoint is kept in {self.run_dir / 'last'}"
                )
            records.append({"iteration": iteration, **logged, **lrs})
        self._append_log(records)
        if self.writer is not None:
            means = {key: float(np.mean([r[key] for r in records])) for key in records[0] if key.startswith("train/")}
            for key, value in {**means, **window[-1][1]}.items():
                self.writer.add_scalar(key, value, records[-1]["iteration"])
        progress.set_postfix(loss=f"{records[-1]['train/loss']:.4f}")
        return [record["train/loss"] for record in records]

    def _append_log(self, records: list[Mapping[str, Any]]) -> None:
        if self.dist.is_main:
            with open(self.run_dir / "train_log.jsonl", "a") as log:
                log.writelines(json.dumps(record) + "\n" for record in records)

    def _save(self, name: str, metrics: Mapping[str, float]) -> None:
        if not self.dist.is_main:
            return
        state = None
        if name == "last":
            state = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "iteration": self.iteration,
                "best_metric": self.best_metric,
            }
        extra = {"run": self.config.to_dict(), "iteration": self.iteration, "metrics": dict(metrics)}
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
                    window.append((self.iteration, lrs, self._train_step(batch)))
                    self.iteration += 1
                    progress.update(1)
                    done = self.iteration == train.iterations
                    out_of_time = train.max_minutes is not None and time.monotonic() - started >= 60 * train.max_minutes
                    validate = self.val_set is not None and (self.iteration % self.config.val.every == 0 or done)
                    save = self.iteration % train.save_every == 0 or done or out_of_time
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
