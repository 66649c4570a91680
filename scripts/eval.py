"""Evaluate a checkpoint on one split of a dataset, print the metrics and write the results JSON.

    python scripts/eval.py dataset=refcoco dataset.split=testA checkpoint=runs/refcoco/best metrics_out=results/refcoco_testA.json
    python scripts/eval.py model=ssp_sam_224 model.clip_checkpoint=... model.sam_checkpoint=... checkpoint=...pth dataset=grefcoco
    torchrun --nproc_per_node=8 scripts/eval.py ...

With ``cache_dir`` set, the SAM embeddings of the split's images are computed first (only those
the cache lacks; SAM's image encoder is not even loaded when the cache is complete) and evaluation
reads them from the cache; otherwise SAM's encoder runs per image. ``samples_out=PATH`` also
writes every sentence's scores (JSON Lines) for failure analysis. ``protocol=`` picks where masks
are compared (metrics.md): ``standard`` (original resolution, the default), ``ssp_sam_release``
(the released evaluator's 512x512 padded frame and its own counts, to reproduce its paper's
tables) or ``rela`` (ReLA's 480x480 gRefCOCO evaluation); the results JSON names it.
``images_per_batch`` images share each encoder call and their sentences the decoder calls;
``workers`` processes read images and cached embeddings ahead; ``precision`` (auto | fp32 | bf16 |
fp16) is printed once and recorded in the results JSON. ``group_key`` (auto: "kind" where the sentences
carry it) breaks the metrics down by a per-sentence key; a key given that no sentence carries is refused.
Every option is checked (type, range, choices; an unknown key such as ``+protocl=rela`` is refused) before
the dataset is read, used by this run or not; ``metrics_out`` and ``samples_out`` must be two files. The
checkpoint's sha256 (and its weight files') is taken when it is loaded: a checkpoint replaced while it loads
(a training saving ``last/``) stops the run instead of recording another epoch's identity.
An OVSS checkpoint (or ovss_dataset=...) is evaluated by ssp_sam/ovss/engine/cli.py instead
(configs/eval_ovss.yaml: mIoU, fwIoU, pAcc, mACC, seen / unseen / hIoU, SAM prompts and seconds per image).
Errors in the user's input (unknown split, missing files, bad checkpoint) end in one ``error:``
line and exit status 2.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ssp_sam.checkpoint import load_model, weight_files_of
from ssp_sam.cli import model_settings, reports_errors
from ssp_sam.config import model_overrides_added
from ssp_sam.data.registry import load_dataset
from ssp_sam.engine.caching import cache_dtype_for, dataset_image_roots, ensure_cache
from ssp_sam.engine.distributed import DistInfo, init_distributed, prepare_cpu_process, shutdown_distributed
from ssp_sam.engine.eval_config import eval_run_config_from
from ssp_sam.engine.evaluator import evaluate, resolve_group_key
from ssp_sam.engine.precision import resolve_precision
from ssp_sam.engine.reporting import CheckpointWatch, check_distinct_outputs, command_line, console_tables, write_results, write_samples
from ssp_sam.errors import ConfigError, first_line
from ssp_sam.model import build_sam_image_encoder
from ssp_sam.outputs import check_output_file
from ssp_sam.ovss.engine.cli import run_ovss_eval, stored_config_overrides, wants_ovss
from ssp_sam.predictor import DEFAULT_CHECKPOINT, resolve_device


def _device_for(requested: str, dist_info: DistInfo) -> torch.device:
    """The requested device; under torchrun on CUDA without an index, this process's GPU."""
    device = resolve_device(requested)
    if dist_info.enabled and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist_info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


@hydra.main(config_path="../configs", config_name="eval_ovss" if wants_ovss(sys.argv[1:]) else "eval", version_base="1.3")
@reports_errors
def main(cfg: DictConfig) -> None:
    if "ovss_dataset" in cfg:
        run_ovss_eval(cfg)
        return
    options = eval_run_config_from(cfg)  # every option typed and in range, unknown keys refused
    check_output_file(options.metrics_out, "metrics_out")  # before the evaluation, not after it
    check_output_file(options.samples_out, "samples_out")
    check_distinct_outputs({"metrics_out": options.metrics_out, "samples_out": options.samples_out})
    model_config = model_settings(cfg)  # model.<key>=v changes the checkpoint's config
    checkpoint = Path(options.checkpoint) if options.checkpoint is not None else DEFAULT_CHECKPOINT
    protocol = options.protocol
    try:
        dataset_cfg = OmegaConf.to_container(cfg.dataset, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{exc.full_key or 'dataset'}: cannot be resolved ({first_line(exc)})") from None
    if options.checkpoint is None and not str(dataset_cfg.get("name", "")).startswith("shapeworld"):
        # The default stands in for a forgotten checkpoint= only where it means something.
        raise ConfigError(
            f"checkpoint: not given, and the default (the shipped ShapeWorld model, {DEFAULT_CHECKPOINT}) knows "
            f"ShapeWorld scenes only; give checkpoint=... to evaluate on {dataset_cfg.get('name')}"
        )
    dataset = load_dataset(dataset_cfg)  # before the model: a wrong split or path fails fast
    dataset_cfg["split"] = dataset.split  # as the reader named it (a JSONL file given by path: its name)
    group_key = resolve_group_key(dataset, options.group_key)  # a misspelt key, before the model loads

    dist_info = init_distributed(resolve_device(options.device))
    try:
        device = _device_for(options.device, dist_info)
        precision = resolve_precision(options.precision, device)
        if device.type == "cpu":
            prepare_cpu_process()
        # With a cache, SAM's image encoder is loaded with the model only when its weights are in the
        # checkpoint (small models); from a weight file, only if the cache lacks some image of the split.
        watch = CheckpointWatch(checkpoint)  # the identity of the weights loaded, not of the file at the end
        model = load_model(checkpoint, model_config, with_sam_image_encoder=True if options.cache_dir is None else None, device=device)
        identity = watch.identity(weight_files_of(model.config))
        cache, cache_dtype = None, None
        if options.cache_dir is not None:
            encoder = model.sam_image_encoder if model.sam_image_encoder is not None else partial(build_sam_image_encoder, model.config)
            cache_dtype = cache_dtype_for(options.cache_dtype, precision)
            cache = ensure_cache(
                options.cache_dir, dataset.image_paths(), dataset_image_roots(dataset_cfg), encoder, model.config.sam_variant,
                model.config.sam_checkpoint, model.sam_image_size, device, dist_info, options.cache_batch_size,
                cache_dtype, options.progress,
            )
        if dist_info.is_main:
            print(f"precision: {precision.name} ({precision.reason})")
        result = evaluate(
            model, dataset, cache=cache, device=device, max_batch=options.max_batch,
            progress=options.progress and dist_info.is_main, group_key=group_key, protocol=protocol,
            images_per_batch=options.images_per_batch, workers=options.workers, precision=precision, compile=options.compile,
        )
    finally:
        shutdown_distributed()
    if not dist_info.is_main:
        return

    print(f"{dataset.name} {dataset.split} ({dataset.task}, protocol {protocol}): {result.n_images} images, {result.n_samples} sentences")
    print(console_tables(result))
    if options.metrics_out is not None:
        write_results(
            options.metrics_out, result, dataset_cfg, model.config.name, checkpoint, command_line(), label=options.label,
            identity=identity, cache_dtype=cache_dtype,
        )
        print(f"wrote {options.metrics_out}")
    if options.samples_out is not None:
        write_samples(options.samples_out, result)
        print(f"wrote {options.samples_out} ({result.n_samples} sentences)")


if __name__ == "__main__":
    if wants_ovss(sys.argv[1:]):
        sys.argv[1:] = stored_config_overrides(sys.argv[1:])
    else:
        sys.argv[1:] = model_overrides_added(sys.argv[1:])  # model.no_target_pixels=N without model=<preset>
    main()
