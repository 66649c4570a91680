"""The SSP-SAM training loop: one process, one GPU or ``torchrun`` DDP, resumable, logged.

Recipe (``../shared/specs/ssp-sam.md``, as the release runs it): frozen CLIP and SAM image
encoders (SAM embeddings read from the on-disk cache), AdamW with two parameter groups (new
modules, SAM mask decoder), the release's per-epoch cosine schedule with linear warm-up
(``optim.py``), gradient clipping, the mask decoder frozen for the first epochs, one random
expression per sample per visit, random letterbox placement.

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

import json
import math
import time
from dataclasses import dataclass, replace
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from ..backbones.clip_tokenizer import CLIPTokenizer
from ..backbones.sam import mask_to_padded_frame
from ..checkpoint import load_own_weights, read_checkpoint_config, read_trainer_state, save_checkpoint
from ..config import model_config_from
from ..data.embedding_cache import EmbeddingCache
from ..data.records import ReferringDataset
from ..data.registry import load_splits
from ..data.training import EpochBatchSampler, ReferringTrainingSet, collate
from ..errors import ConfigError, SSPSAMError
from ..fileio import atomic_path
from ..image_io import load_image
from ..losses import rec_loss, ssp_sam_loss
from ..metrics import RELEASE_SUFFIX
from ..model import build_model, build_sam_image_encoder
from ..predictor import Predictor, resolve_device
from ..visualize import overlay
from .caching import dataset_image_roots, ensure_cache
from .distributed import DistInfo, barrier, init_distributed, mean_across_ranks, shutdown_distributed
from .evaluator import evaluate
from .host_memory import keep_freed_host_memory, shared_with_forked_workers
from .optim import SCHEDULES, build_schedule, parameter_groups
from .protocols import check_protocol, release_gt_frame
from .rec_validation import REC_METRIC, rec_accuracy
from .reporting import command_line, console_tables, write_results
from .run_dir import recover_run_dir
from .train_config_check import check_train_config

# The validation metric that picks the best checkpoint of stage "res", per task (stage "rec": REC_METRIC);
# with val.protocol=ssp_sam_release its release-arithmetic version (key + RELEASE_SUFFIX), as the release selects.
SELECTION_METRIC = {"res": "mIoU", "gres": "gIoU", "phrasecut": "mIoU"}
STAGES = ("rec", "res")


def release_mask_target(mask: np.ndarray, sam_image_size: int) -> Tensor:
    """The release's training target: its GT processing (``protocols.release_gt_frame``) as 0/1 float (S/2, S/2)."""
    return torch.from_numpy(release_gt_frame(mask, sam_image_size)).float()


# train.mask_target: how a GT mask becomes the (S/2, S/2) target of the mask losses.
MASK_TARGETS = {"release": release_mask_target, "nearest": mask_to_padded_frame}


class TrainingDivergedError(SSPSAMError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    run_dir: Path
    epochs_run: int
    best_metric: Optional[float]
    last_metrics: dict[str, float]
    losses: list[float]  # the mean training loss of every step of this invocation


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def _autocast_dtype(setting: Any, device: torch.device) -> Optional[torch.dtype]:
    """Mixed precision: "auto" uses bf16 on CUDA where supported, else fp16 on CUDA, none on CPU."""
    if setting in (False, "false", "off", None) or device.type != "cuda":
        if setting is True and device.type != "cuda":
            raise ConfigError("train.amp=true needs a CUDA device; use train.amp=auto on CPU")
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class Trainer:
    """Owns the model, data, optimizer and logs of one training run."""

    def __init__(self, cfg: DictConfig) -> None:
        check_train_config(cfg)  # a bad train.* value or run_dir: one line now, not a traceback after caching
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dist: DistInfo = init_distributed(self.device)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        else:
            keep_freed_host_memory()  # large CPU activations reuse freed memory instead of page-faulting
        self.run_dir = Path(cfg.run_dir)
        self.train_cfg = cfg.train
        _seed_everything(int(cfg.seed))

        self.stage = str(self.train_cfg.stage)
        self._check_recipe_settings()
        self.model_config = model_config_from(OmegaConf.to_container(cfg.model, resolve=True))
        if self.stage == "rec":  # no SAM weights: the mask head (never run) keeps its random initialisation
            self.model_config = replace(self.model_config, sam_checkpoint=None)
        self.model = build_model(
            self.model_config,
            with_sam_image_encoder=bool(self.train_cfg.save_encoders),
            without_weight_files=("sam",) if self.stage == "rec" else (),
        )
        if cfg.init_checkpoint:
            self._load_init_checkpoint(cfg.init_checkpoint)
        self.model.to(self.device)

        self.dataset_cfg = OmegaConf.to_container(cfg.dataset, resolve=True)
        self.datasets = self._read_datasets()
        self.cache = self._prepare_cache() if self.stage == "res" else None
        self.tokenizer = CLIPTokenizer(self.model.clip.context_length, self.model_config.append_period)
        self.train_set = ReferringTrainingSet(
            self.datasets["train"],
            self.cache,
            self.model.clip.image_size,
            self.model.sam_image_size,
            self.tokenizer,
            seed=int(cfg.seed),
            augment=bool(self.train_cfg.augment),
            need_masks=self.stage == "res",
            expression_weights=self.train_cfg.expression_weights,
            expression_weight_key=str(self.train_cfg.expression_weight_key),
            mask_frame=MASK_TARGETS[self.train_cfg.mask_target],
        )
        global_batch = int(self.train_cfg.batch_size)
        if global_batch > len(self.train_set):
            raise ConfigError(f"train.batch_size={global_batch} is larger than the training set ({len(self.train_set)} referents)")
        if global_batch % self.dist.world_size:
            raise ConfigError(f"train.batch_size={global_batch} is not divisible by the {self.dist.world_size} processes")
        self.sampler = EpochBatchSampler(len(self.train_set), global_batch, int(cfg.seed), self.dist.rank, self.dist.world_size)
        workers = int(self.train_cfg.workers)
        self.loader = DataLoader(
            self.train_set,
            batch_sampler=self.sampler,
            collate_fn=collate,
            num_workers=workers,
            persistent_workers=False,
            pin_memory=self.device.type == "cuda",
        )
        self.steps_per_epoch = len(self.sampler)
        if self.train_cfg.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, int(self.train_cfg.max_steps_per_epoch))

        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.model, float(self.train_cfg.lr), float(self.train_cfg.decoder_lr), float(self.train_cfg.weight_decay))
        )
        self.schedule = str(self.train_cfg.schedule)
        self.scheduler = build_schedule(
            self.optimizer, self.schedule, int(self.train_cfg.epochs), self.steps_per_epoch,
            int(self.train_cfg.warmup_epochs), float(self.train_cfg.min_lr),
        )
        self.autocast_dtype = _autocast_dtype(self.train_cfg.amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.autocast_dtype == torch.float16)
        self.start_epoch = 0
        self.best_metric: Optional[float] = None
        self.writer = None
        self._ddp: Optional[DistributedDataParallel] = None
        self._ddp_trainable: Optional[tuple[bool, ...]] = None
        self._resume_or_check_run_dir()
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------------------------ setup

    def _check_recipe_settings(self) -> None:
        """Stage and schedule names, and what the REC stage cannot do, before any data is read."""
        if self.stage not in STAGES:
            raise ConfigError(f"train.stage: unknown stage {self.stage!r}; expected one of {', '.join(STAGES)}")
        if self.train_cfg.schedule not in SCHEDULES:
            raise ConfigError(f"train.schedule: unknown schedule {self.train_cfg.schedule!r}; expected one of {', '.join(SCHEDULES)}")
        if self.train_cfg.mask_target not in MASK_TARGETS:
            raise ConfigError(f"train.mask_target: unknown target {self.train_cfg.mask_target!r}; expected one of {', '.join(MASK_TARGETS)}")
        check_protocol(self.cfg.val.protocol)
        if self.stage == "rec" and self.train_cfg.save_encoders:
            raise ConfigError("train.save_encoders=true: the REC stage (train.stage=rec) builds no SAM image encoder to save")
        if self.stage == "rec" and self.cfg.test.split:
            raise ConfigError("test.split: the REC stage (train.stage=rec) is validated by REC accuracy on val.split only; set test.split=null")

    def _load_init_checkpoint(self, path: str) -> None:
        """Start from the weights of one of our checkpoints.

        A checkpoint of the REC stage holds an untrained mask head (that stage runs no SAM): stage 2
        keeps the mask head of SAM's own weight file instead, as the release's stage 2 starts from
        SAM's decoder (its pretraining never changes it).
        """
        run = read_checkpoint_config(path).get("run") or {}
        from_rec_stage = (run.get("train") or {}).get("stage") == "rec"
        sam_head = {k: v.clone() for k, v in self.model.mask_head.state_dict().items()} if from_rec_stage else None
        load_own_weights(self.model, path)
        if sam_head is not None:
            self.model.mask_head.load_state_dict(sam_head)

    def _read_datasets(self) -> dict[str, ReferringDataset]:
        """The train split, and the val and test splits when the config names them."""
        wanted = {"train": self.train_cfg.split, "val": self.cfg.val.split, "test": self.cfg.test.split}
        wanted = {role: split for role, split in wanted.items() if split}
        splits = load_splits(self.dataset_cfg, list(wanted.values()))
        return {role: splits[split] for role, split in wanted.items()}

    def _prepare_cache(self) -> EmbeddingCache:
        """Make sure every train/val image has a cached SAM embedding (each rank computes its share)."""
        config = self.model_config
        encoder = self.model.sam_image_encoder
        if encoder is None:  # built only if the cache lacks an image, freed afterwards
            encoder = partial(build_sam_image_encoder, config)
        return ensure_cache(
            self.cfg.cache_dir, [p for d in self.datasets.values() for p in d.image_paths()], dataset_image_roots(self.dataset_cfg),
            encoder, config.sam_variant, config.sam_checkpoint, self.model.sam_image_size, self.device, self.dist,
            batch_size=int(self.cfg.cache_batch_size),
        )

    def _resume_or_check_run_dir(self) -> None:
        if self.dist.is_main:
            recover_run_dir(self.run_dir)  # finish or roll back a save cut short by a crash (run_dir.py)
        barrier(self.dist)
        last = self.run_dir / "last"
        if last.exists() and not self.cfg.resume:
            raise ConfigError(f"run_dir={self.run_dir} already holds a run; pass resume=true to continue it or choose another run_dir")
        if not self.cfg.resume:
            self._truncate_log(0)  # the log of an attempt that saved no checkpoint: start it afresh
            return
        if not last.exists():
            raise ConfigError(f"resume=true but {last} does not exist (nothing to resume)")
        load_own_weights(self.model, last)
        state = read_trainer_state(last)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        self.start_epoch = int(state["epoch"]) + 1
        self.best_metric = state.get("best_metric")
        self._truncate_log(self.start_epoch)

    def _truncate_log(self, epoch: int) -> None:
        """Drop the log lines of an interrupted epoch, which the resumed run trains again."""
        log = self.run_dir / "train_log.jsonl"
        if not self.dist.is_main or not log.exists():
            return
        kept = []
        for line in log.read_text().splitlines():
            try:
                if json.loads(line)["epoch"] < epoch:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut short by the interruption
        with atomic_path(log) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept))

    # ------------------------------------------------------------------------------------ helpers

    def _forward_model(self) -> torch.nn.Module:
        """The model to call for training: wrapped in DDP (re-wrapped when the trainable set changes)."""
        if not self.dist.enabled:
            return self.model
        trainable = tuple(p.requires_grad for p in self.model.parameters())
        if self._ddp is None or trainable != self._ddp_trainable:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self._ddp = DistributedDataParallel(self.model, device_ids=device_ids, find_unused_parameters=True)
            self._ddp_trainable = trainable
        return self._ddp

    def _set_decoder_trainable(self, epoch: int) -> None:
        trainable = self.stage == "res" and epoch >= int(self.train_cfg.decoder_freeze_epochs)
        self.model.mask_head.mask_decoder.requires_grad_(trainable)

    def _log_scalars(self, values: Mapping[str, float], step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def _append_log(self, record: Mapping[str, Any]) -> None:
        """One JSON line per step in <run_dir>/train_log.jsonl (plain-text loss curves)."""
        if self.dist.is_main:
            with open(self.run_dir / "train_log.jsonl", "a") as log:
                log.write(json.dumps(record) + "\n")

    def _save(self, name: str, epoch: int, metrics: Mapping[str, float]) -> None:
        if not self.dist.is_main:
            return
        trainer_state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "epoch": epoch,
            "best_metric": self.best_metric,
        }
        extra = {"run": OmegaConf.to_container(self.cfg, resolve=True), "epoch": epoch, "metrics": dict(metrics)}
        save_checkpoint(
            self.model, self.run_dir / name, extra=extra,
            embed_encoders=bool(self.train_cfg.save_encoders),
            trainer_state=trainer_state if name == "last" else None,
        )

    # ------------------------------------------------------------------------------------ loop

    def train_one_epoch(self, epoch: int) -> list[float]:
        self.model.train()
        self._set_decoder_trainable(epoch)
        self.train_set.set_epoch(epoch)
        self.sampler.set_epoch(epoch)
        model = self._forward_model()
        losses = []
        progress = tqdm(
            total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{self.train_cfg.epochs}", unit="step",
            disable=not self.dist.is_main, dynamic_ncols=True,
        )
        with shared_with_forked_workers(enabled=self.loader.num_workers > 0):  # host_memory.py
            for step, batch in enumerate(islice(self.loader, self.steps_per_epoch)):
                global_step = epoch * self.steps_per_epoch + step
                lrs = {f"lr/{group['name']}": group["lr"] for group in self.optimizer.param_groups}  # this step's
                terms = self._train_step(model, batch, epoch, step)
                logged = mean_across_ranks({f"train/{k}": v.item() for k, v in terms.items()}, self.dist, self.device)
                losses.append(logged["train/loss"])
                self._append_log({"epoch": epoch, "step": global_step, **logged, **lrs})
                if global_step % int(self.train_cfg.log_every) == 0:
                    self._log_scalars({**logged, **lrs}, global_step)
                progress.set_postfix(loss=f"{logged['train/loss']:.4f}")
                progress.update(1)
        progress.close()
        if self.schedule == "per_epoch":
            self.scheduler.step()  # the next epoch's learning rate, as the release's scheduler.step(epoch + 1)
        return losses

    def _train_step(self, model: torch.nn.Module, batch: dict, epoch: int, step: int) -> dict[str, Tensor]:
        """Forward, loss, backward and optimizer step on one batch (and a per-iteration schedule's step).

        Stage "rec" passes no SAM embeddings: the model computes the box only. Returns the loss terms.
        """
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None):
            output = model(batch["clip_pixels"], batch["tokens"], batch.get("sam_embedding"))
        if self.stage == "rec":
            terms = rec_loss(output.boxes, batch["box"])
        else:
            terms = ssp_sam_loss(output.mask_logits.float(), batch["mask"], output.boxes.float(), batch["box"])
        loss = terms["loss"]
        if not torch.isfinite(loss):
            raise TrainingDivergedError(
                f"the training loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                f"the last good checkpoint is kept in {self.run_dir / 'last'}"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        if self.train_cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], float(self.train_cfg.grad_clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.schedule == "per_iteration":
            self.scheduler.step()
        return terms

    @torch.no_grad()
    def validate(self, epoch: int) -> dict[str, float]:
        if "val" not in self.datasets:
            return {}
        self.model.eval()
        dataset = self.datasets["val"]
        step = (epoch + 1) * self.steps_per_epoch
        if self.stage == "rec":
            metrics = rec_accuracy(self.model, dataset, self.device, self.dist, max_batch=int(self.cfg.val.max_batch))
            self._log_scalars({f"val/{k}": v for k, v in metrics.items() if isinstance(v, float)}, step)
            return metrics
        result = evaluate(
            self.model, dataset, cache=self.cache, device=self.device, max_batch=int(self.cfg.val.max_batch),
            progress=self.dist.is_main, protocol=str(self.cfg.val.protocol),
        )
        self._log_scalars({f"val/{k}": v for k, v in result.metrics.items() if isinstance(v, float)}, step)
        if self.writer is not None and int(self.cfg.val.overlays) > 0:
            self._log_overlays(dataset, step)
        return result.metrics

    def _log_overlays(self, dataset: ReferringDataset, step: int) -> None:
        predictor = Predictor(self.model, device=self.device)
        for index, sample in enumerate(list(dataset)[: int(self.cfg.val.overlays)]):
            encoded = predictor.encode_image(sample.image_path, sam_embedding=self.cache.get(sample.image_path))
            prediction = predictor.predict(encoded, [sample.expressions[0]])[0]
            picture = overlay(load_image(sample.image_path), prediction.mask, prediction.box, sample.expressions[0])
            self.writer.add_image(f"val/overlay_{index}", np.asarray(picture), step, dataformats="HWC")

    def _selection_metric(self) -> str:
        if self.stage == "rec":
            return REC_METRIC
        metric = SELECTION_METRIC[self.datasets["train"].task]
        return metric + RELEASE_SUFFIX if self.cfg.val.protocol == "ssp_sam_release" else metric

    def fit(self) -> TrainResult:
        if self.dist.is_main:
            self.writer = SummaryWriter(str(self.run_dir / "tb"))
        selection = self._selection_metric()
        all_losses: list[float] = []
        metrics: dict[str, float] = {}
        epochs = int(self.train_cfg.epochs)
        try:
            for epoch in range(self.start_epoch, epochs):
                started = time.time()
                all_losses += self.train_one_epoch(epoch)
                if (epoch + 1) % int(self.cfg.val.every) == 0 or epoch + 1 == epochs:
                    metrics = self.validate(epoch)
                # >=: a tie goes to the later epoch, as in the release
                improved = selection in metrics and (self.best_metric is None or metrics[selection] >= self.best_metric)
                if improved:
                    self.best_metric = metrics[selection]
                self._save("last", epoch, metrics)
                if improved or "val" not in self.datasets:
                    self._save("best", epoch, metrics)
                barrier(self.dist)
                if self.dist.is_main:
                    shown = f", val {selection} {metrics[selection]:.4f}" if selection in metrics else ""
                    mean_loss = float(np.mean(all_losses[-self.steps_per_epoch :])) if all_losses else math.nan
                    tqdm.write(f"epoch {epoch + 1}/{epochs}: loss {mean_loss:.4f}{shown} ({time.time() - started:.0f}s)")
        finally:
            if self.writer is not None:
                self.writer.close()
        return TrainResult(self.run_dir, epochs - self.start_epoch, self.best_metric, metrics, all_losses)


    def test(self) -> Optional[Path]:
        """Evaluate the best checkpoint on ``test.split`` and write the results JSON into the run directory.

        Returns the JSON's path (None without a test split, and on ranks other than 0).
        """
        if "test" not in self.datasets:
            return None
        load_own_weights(self.model, self.run_dir / "best")
        self.model.eval()
        dataset = self.datasets["test"]
        result = evaluate(self.model, dataset, cache=self.cache, device=self.device, max_batch=int(self.cfg.val.max_batch), progress=self.dist.is_main)
        if not self.dist.is_main:
            return None
        path = self.run_dir / f"results_{dataset.name}_{dataset.split}.json"
        write_results(path, result, {**self.dataset_cfg, "split": dataset.split}, self.model_config.name, self.run_dir / "best", command_line(), label=str(self.cfg.name))
        tqdm.write(f"{dataset.name} {dataset.split}:\n{console_tables(result)}\nwrote {path}")
        return path


def train(cfg: DictConfig) -> TrainResult:
    """Train as ``cfg`` says (see configs/train.yaml), then evaluate on the test split if one is named."""
    try:
        trainer = Trainer(cfg)
        result = trainer.fit()
        trainer.test()
        return result
    finally:
        shutdown_distributed()

