"""What ``scripts/train.py`` and ``scripts/eval.py`` do for OVSS models, and which primary config they compose.

The scripts keep one command for both systems: an OVSS run is recognised from its arguments before Hydra
composes anything (:func:`wants_ovss`), and then ``configs/train_ovss.yaml`` / ``configs/eval_ovss.yaml``
are composed instead of SSP-SAM's ``train.yaml`` / ``eval.yaml`` (``--config-name`` still wins).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ...engine.distributed import init_distributed, prepare_cpu_process, shutdown_distributed
from ...engine.caching import ensure_cache, cache_dtype_for
from ...engine.config_fields import check_fields, merge_config
from ...engine.precision import resolve_precision
from ...engine.reporting import checkpoint_sha256, command_line
from ...errors import ConfigError, first_line
from ...fileio import write_json
from ...outputs import check_output_file
from ...predictor import resolve_device
from ..data import load_ovss_dataset
from ..model_config import ovss_config_from
from .checkpoint import is_ovss_checkpoint, load_ovss_model, read_ovss_checkpoint_config
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


def run_ovss_eval(cfg: DictConfig) -> None:
    """``scripts/eval.py`` for an OVSS checkpoint (configs/eval_ovss.yaml): metrics printed, results JSON written."""
    check_output_file(cfg.metrics_out, "metrics_out")
    if cfg.threads is not None:
        torch.set_num_threads(int(cfg.threads))
    try:
        dataset_cfg = OmegaConf.to_container(cfg.ovss_dataset, resolve=True)
        overrides = OmegaConf.to_container(cfg.ovss_model, resolve=True) or {}
        options_raw = OmegaConf.to_container(cfg.eval, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{exc.full_key or 'config'}: cannot be resolved ({first_line(exc)})") from None
    for key, least in (("workers", 0), ("cache_batch_size", 1)):
        if not isinstance(cfg[key], int) or cfg[key] < least:
            raise ConfigError(f"{key}: must be an integer >= {least}, got {cfg[key]!r}")
    # The stored model config (its input size): the sliding window is checked before the model loads.
    model_config = ovss_config_from(read_ovss_checkpoint_config(cfg.checkpoint)["ovss_model"], **overrides)
    options = _eval_options(options_raw, model_config.image_size)
    if cfg.cache_dir is not None and model_config.uses_sam and options.sliding_window:
        raise ConfigError("cache_dir: cached SAM embeddings are of whole images; give eval.sliding_window=false or cache_dir=null")
    dataset = load_ovss_dataset(dataset_cfg)  # before the model: a wrong split or path fails fast
    dist_info = init_distributed(resolve_device(cfg.device))
    try:
        device = resolve_device(cfg.device)
        if dist_info.enabled and device.type == "cuda":
            device = torch.device("cuda", dist_info.local_rank)
        precision = resolve_precision(cfg.precision, device)
        if device.type == "cpu":
            prepare_cpu_process()
        loaded = load_ovss_model(cfg.checkpoint, device, overrides)
        cache = None
        if cfg.cache_dir is not None and loaded.config.uses_sam:
            proposer = loaded.model.proposer
            cache = ensure_cache(
                cfg.cache_dir, [s.image_path for s in dataset.samples[: cfg.max_images]], [Path(str(dataset_cfg["root"]))],
                proposer.image_encoder, loaded.config.sam.variant, loaded.config.sam.checkpoint, proposer.sam_size, device,
                dist_info, int(cfg.cache_batch_size), cache_dtype_for("auto", precision), progress=bool(cfg.progress),
                model_input_size=loaded.model.image_size,
            )
        if dist_info.is_main:
            print(f"precision: {precision.name} ({precision.reason})")
        result = evaluate_ovss(
            loaded.model, dataset, options, device, precision, cache, dist_info,
            progress=bool(cfg.progress) and dist_info.is_main, max_images=cfg.max_images, workers=int(cfg.workers),
        )
    finally:
        shutdown_distributed()
    if not dist_info.is_main:
        return
    config = loaded.config
    name = f"{config.name} {config.variant}" + (f" ({config.points})" if config.variant == "sam_mi" else "")
    print(f"{dataset.name} {dataset.split}: {result.n_images} images, {name}")
    print(console_line(result))
    if cfg.metrics_out is not None:
        record = {
            **result_record(result),
            "dataset": str(dataset_cfg["name"]),
            "split": str(dataset_cfg["split"]),
            "eval": vars(options),
            "model": config.name,
            "variant": config.variant,
            "points": config.points if config.variant == "sam_mi" else None,
            "label": str(cfg.label) if cfg.label is not None else name,
            "ovss_model": config.to_dict(),
            "checkpoint": str(cfg.checkpoint),
            "checkpoint_sha256": checkpoint_sha256(cfg.checkpoint),
            "sam_embeddings_cached": cache is not None,
            "command": command_line(),
        }
        write_json(cfg.metrics_out, record)
        print(f"wrote {cfg.metrics_out}")


def _eval_options(raw: dict, image_size: int) -> OVSSEvalSection:
    """``eval:`` of configs/eval_ovss.yaml, checked, its defaults filled in for a model of input side ``image_size``."""
    options = merge_config(OVSSEvalSection, raw, {"eval": raw}, "an evaluation option (configs/eval_ovss.yaml lists them)", prefix="eval.")
    check_fields("eval.", options, {"eval": raw})
    return settled_eval_section(options, image_size)
