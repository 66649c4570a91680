"""What ``scripts/train.py`` and ``scripts/eval.py`` do for OVSS models, and which primary config they compose.

The scripts keep one command for both systems: an OVSS run is recognised from its arguments before Hydra
composes anything (:func:`wants_ovss`), and then ``configs/train_ovss.yaml`` / ``configs/eval_ovss.yaml``
are composed instead of SSP-SAM's ``train.yaml`` / ``eval.yaml`` (``--config-name`` still wins).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ...engine.distributed import init_distributed, prepare_cpu_process, shutdown_distributed
from ...engine.caching import ensure_cache, cache_dtype_for
from ...engine.config_fields import check_fields, choice, merge_config, number
from ...engine.precision import PRECISIONS, resolve_precision
from ...engine.reporting import CheckpointWatch, command_line
from ...errors import ConfigError, first_line
from ...fileio import write_json
from ...outputs import check_output_file
from ...predictor import resolve_device
from ..data import load_ovss_dataset
from ..model_config import ovss_config_from
from .checkpoint import is_ovss_checkpoint, load_ovss_model, read_ovss_checkpoint_config, weight_files_of
from .evaluator import console_line, evaluate_ovss, result_record
from .train_config import OVSSEvalSection, settled_eval_section

def wants_ovss(argv: Sequence[str]) -> bool:
    """True when the command line names an OVSS experiment, model, dataset or checkpoint."""
    for argument in argv:
        key, _, value = argument.partition("=")
        key = key.lstrip("+~")
        if key == "experiment" and value.startswith("ovss_"):
            return True
        if key.split(".")[0] in ("ovss_model", "ovss_dataset"):
            return True
        if key == "checkpoint" and value and is_ovss_checkpoint(value):
            return True
    return False


def stored_config_overrides(argv: Sequence[str]) -> list[str]:
    """``argv`` with every ``ovss_model.<key>=value`` made ``++ovss_model.<key>=value``.

    configs/eval_ovss.yaml cannot list the stored model config's keys (they are the checkpoint's),
    so its ``ovss_model`` node starts empty and Hydra's struct mode would refuse
    ``ovss_model.points=grid`` as an unknown key; ``++`` adds or replaces it, so the override is
    written as for training. The values are checked against OVSSModelConfig when the model loads.
    """
    return [f"++{argument}" if argument.startswith("ovss_model.") else argument for argument in argv]


@dataclass
class OVSSEvalRunConfig:
    """The top-level options of configs/eval_ovss.yaml (``eval:`` is :class:`OVSSEvalSection`; ``ovss_model``
    and ``ovss_dataset`` are checked by the model's config and the dataset registry)."""

    checkpoint: str = ""
    metrics_out: Optional[str] = None
    label: Optional[str] = None
    cache_dir: Optional[str] = None
    cache_batch_size: int = number(4, 1)
    device: str = "auto"
    threads: Optional[int] = number(None, 1, optional=True)
    precision: str = choice("auto", PRECISIONS)
    workers: int = number(2, 0)
    max_images: Optional[int] = number(None, 1, optional=True)
    progress: bool = True


_OVSS_SECTIONS = ("ovss_model", "ovss_dataset", "eval")


def ovss_eval_run_config_from(cfg: DictConfig) -> OVSSEvalRunConfig:
    """The top-level options of an OVSS evaluation, checked before any work (whether this run uses them or not).

    Raises:
        ConfigError: one line naming the first unknown key (``+max_image=2``), or value of the wrong type,
            out of range or not one of its choices.
        MissingMandatoryValue: ``checkpoint`` not given (scripts name it).
    """
    cfg.checkpoint  # noqa: B018 -- not given (???): named by reports_errors as "checkpoint: missing"
    try:
        raw = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{exc.full_key or 'config'}: cannot be resolved ({first_line(exc)})") from None
    sections = {key: value for key, value in raw.items() if key not in _OVSS_SECTIONS}
    options = merge_config(OVSSEvalRunConfig, sections, raw, "an OVSS evaluation option (configs/eval_ovss.yaml lists them)")
    check_fields("", options, raw)
    return options


def run_ovss_eval(cfg: DictConfig) -> None:
    """``scripts/eval.py`` for an OVSS checkpoint (configs/eval_ovss.yaml): metrics printed, results JSON written."""
    run = ovss_eval_run_config_from(cfg)
    check_output_file(run.metrics_out, "metrics_out")
    try:
        dataset_cfg = OmegaConf.to_container(cfg.ovss_dataset, resolve=True)
        overrides = OmegaConf.to_container(cfg.ovss_model, resolve=True) or {}
        options_raw = OmegaConf.to_container(cfg.eval, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{exc.full_key or 'config'}: cannot be resolved ({first_line(exc)})") from None
    if run.threads is not None:
        torch.set_num_threads(run.threads)
    # The identity of the weights evaluated is taken around their reading (CheckpointWatch), from here on.
    watch = CheckpointWatch(run.checkpoint)
    # The stored model config (its input size): the sliding window is checked before the model loads.
    model_config = ovss_config_from(read_ovss_checkpoint_config(run.checkpoint)["ovss_model"], **overrides)
    options = _eval_options(options_raw, model_config.image_size)
    if run.cache_dir is not None and model_config.uses_sam and options.sliding_window:
        raise ConfigError("cache_dir: cached SAM embeddings are of whole images; give eval.sliding_window=false or cache_dir=null")
    dataset = load_ovss_dataset(dataset_cfg)  # before the model: a wrong split or path fails fast
    dist_info = init_distributed(resolve_device(run.device))
    try:
        device = resolve_device(run.device)
        if dist_info.enabled and device.type == "cuda":
            device = torch.device("cuda", dist_info.local_rank)
        precision = resolve_precision(run.precision, device)
        if device.type == "cpu":
            prepare_cpu_process()
        loaded = load_ovss_model(run.checkpoint, device, overrides)
        identity = watch.identity(weight_files_of(loaded.config))
        cache = None
        if run.cache_dir is not None and loaded.config.uses_sam:
            proposer = loaded.model.proposer
            cache = ensure_cache(
                run.cache_dir, [s.image_path for s in dataset.samples[: run.max_images]], [Path(str(dataset_cfg["root"]))],
                proposer.image_encoder, loaded.config.sam.variant, loaded.config.sam.checkpoint, proposer.sam_size, device,
                dist_info, run.cache_batch_size, cache_dtype_for("auto", precision), progress=run.progress,
                model_input_size=loaded.model.image_size,
            )
        if dist_info.is_main:
            print(f"precision: {precision.name} ({precision.reason})")
        result = evaluate_ovss(
            loaded.model, dataset, options, device, precision, cache, dist_info,
            progress=run.progress and dist_info.is_main, max_images=run.max_images, workers=run.workers,
        )
    finally:
        shutdown_distributed()
    if not dist_info.is_main:
        return
    config = loaded.config
    name = f"{config.name} {config.variant}" + (f" ({config.points})" if config.variant == "sam_mi" else "")
    print(f"{dataset.name} {dataset.split}: {result.n_images} images, {name}")
    print(console_line(result))
    if run.metrics_out is not None:
        record = {
            **result_record(result),
            "dataset": str(dataset_cfg["name"]),
            "split": str(dataset_cfg["split"]),
            "eval": vars(options),
            "model": config.name,
            "variant": config.variant,
            "points": config.points if config.variant == "sam_mi" else None,
            "label": run.label if run.label is not None else name,
            "ovss_model": config.to_dict(),
            "checkpoint": run.checkpoint,
            "checkpoint_sha256": identity.sha256,  # taken when the model was loaded
            "weight_files": identity.weight_files,
            "sam_embeddings_cached": cache is not None,
            "command": command_line(),
        }
        write_json(run.metrics_out, record)
        print(f"wrote {run.metrics_out}")


def _eval_options(raw: dict, image_size: int) -> OVSSEvalSection:
    """``eval:`` of configs/eval_ovss.yaml, checked, its defaults filled in for a model of input side ``image_size``."""
    options = merge_config(OVSSEvalSection, raw, {"eval": raw}, "an evaluation option (configs/eval_ovss.yaml lists them)", prefix="eval.")
    check_fields("eval.", options, {"eval": raw})
    return settled_eval_section(options, image_size)
