"""Compute the SAM image embeddings of a dataset once and store them in the embedding cache.

    python scripts/cache_embeddings.py dataset=refcoco sam_checkpoint=weights/sam_vit_h_4b8939.pth
    torchrun --nproc_per_node=8 scripts/cache_embeddings.py dataset=refcoco sam_checkpoint=...   # 8 writers
    python scripts/cache_embeddings.py dataset=shapeworld checkpoint=runs/tiny/best   # our checkpoint's SAM encoder

The cache lives in ``<cache_dir>/<variant>-<input size>-<encoder id>/`` and is keyed by the image's
path inside the dataset's image root, so RefCOCO, RefCOCO+ and RefCOCOg share the COCO embeddings
and a moved dataset keeps them. Only missing and invalid entries are computed: re-running after an
interruption resumes, and re-running on a complete cache just checks it. Under ``torchrun`` each
process computes its share of the missing images and then waits for the others' files (no process
group is needed; see ssp_sam/engine/caching.py). Prints one summary line per process; our errors
print ``error: ...`` and exit with status 2: also an empty ``splits=[]`` or splits without images (nothing
to cache is not a success), and ``sam_variant=`` / ``sam_custom=`` given with ``checkpoint=``, whose own
config says which SAM encoder it holds.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from ssp_sam.backbones.sam import build_sam
from ssp_sam.checkpoint import is_own_checkpoint, load_model
from ssp_sam.cli import reports_errors
from ssp_sam.data.records import select_splits
from ssp_sam.data.registry import read_splits
from ssp_sam.engine.caching import dataset_image_roots, ensure_cache
from ssp_sam.engine.distributed import DistInfo
from ssp_sam.errors import ConfigError
from ssp_sam.predictor import resolve_device


def given_keys(overrides: Sequence[str]) -> set[str]:
    """The top-level keys the command line sets (``sam_variant=vit_b``, ``+x=1``, ``++x=1``; not ``~x``)."""
    return {override.lstrip("+").split("=", 1)[0].split(".", 1)[0] for override in overrides if not override.startswith("~")}


def check_weights_source(cfg: DictConfig, given: set[str] = frozenset()) -> None:
    """Fail before reading any data when no SAM encoder weights are named, or when ``given`` (the keys the
    command line sets) names a SAM variant or sizes beside ``checkpoint=``, whose config decides them."""
    if cfg.checkpoint is None and cfg.sam_checkpoint is None:
        raise ConfigError(
            "sam_checkpoint: required (SAM's weight file, e.g. sam_vit_h_4b8939.pth) "
            "unless checkpoint= names one of our SSP-SAM checkpoint directories"
        )
    if cfg.checkpoint is not None and not is_own_checkpoint(cfg.checkpoint):
        raise ConfigError(
            f"checkpoint: {cfg.checkpoint} is not an SSP-SAM checkpoint directory "
            "(a released .pth has no SAM image encoder: give sam_checkpoint instead)"
        )
    ignored = [key for key in ("sam_variant", "sam_custom") if key in given]
    if cfg.checkpoint is not None and ignored:
        raise ConfigError(
            f"{' and '.join(ignored)}: the SAM image encoder comes from checkpoint={cfg.checkpoint}, whose config.json says "
            f"its variant and sizes; leave {' and '.join(ignored)} out with checkpoint= (sam_checkpoint= may name its weight file)"
        )


def dataset_images(dataset_cfg: DictConfig, splits: str | ListConfig | None) -> tuple[list[str], list[Path]]:
    """The chosen splits (default all) and their distinct image files, in dataset order."""
    requested = [splits] if isinstance(splits, str) else (list(splits) if splits is not None else None)
    if requested is not None and not requested:
        raise ConfigError("splits: an empty list names no split to cache; give at least one, or splits=null for every split")
    available = read_splits(dataset_cfg)
    chosen = select_splits(requested, list(available), f"dataset {dataset_cfg.name}")
    images = dict.fromkeys(path for split in chosen for path in available[split].image_paths())
    if not images:
        raise ConfigError(f"splits: dataset {dataset_cfg.name} has no images in {', '.join(chosen) or 'any split'}; nothing to cache")
    return chosen, list(images)


def encoder_source(cfg: DictConfig) -> tuple[nn.Module | Callable[[], nn.Module], str, str | None, int]:
    """(SAM image encoder or a function that builds it, variant, weight file, input size).

    From a weight file the encoder is built only if some image lacks its embedding; its input
    size comes from a weightless build on the meta device.
    """
    if cfg.checkpoint is not None:
        overrides = {"sam_checkpoint": cfg.sam_checkpoint} if cfg.sam_checkpoint is not None else None
        model = load_model(cfg.checkpoint, overrides)
        return model.sam_image_encoder, model.config.sam_variant, model.config.sam_checkpoint, model.sam_image_size
    custom = OmegaConf.to_container(cfg.sam_custom, resolve=True) if cfg.sam_custom is not None else None

    def build_encoder(weights: str | None = cfg.sam_checkpoint) -> nn.Module:
        return build_sam(cfg.sam_variant, weights, custom, parts=("image_encoder",)).image_encoder

    with torch.device("meta"):
        image_size = build_encoder(weights=None).img_size
    return build_encoder, cfg.sam_variant, cfg.sam_checkpoint, image_size


def ranks_from_environment() -> DistInfo:
    """This process's rank among ``torchrun``'s (RANK, WORLD_SIZE, LOCAL_RANK); one process otherwise."""
    return DistInfo(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0")))


@hydra.main(config_path="../configs", config_name="cache_embeddings", version_base="1.3")
@reports_errors
def main(cfg: DictConfig) -> None:
    check_weights_source(cfg, given_keys(HydraConfig.get().overrides.task))
    ranks = ranks_from_environment()
    splits, images = dataset_images(cfg.dataset, cfg.splits)
    encoder, variant, sam_checkpoint, image_size = encoder_source(cfg)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and device.index is None and ranks.enabled:
        device = torch.device("cuda", ranks.local_rank)
    cache = ensure_cache(
        cfg.cache_dir, images, dataset_image_roots(cfg.dataset), encoder, variant, sam_checkpoint, image_size, device, ranks,
        batch_size=cfg.batch_size, dtype=cfg.dtype, progress=cfg.progress, verify=cfg.verify, threads=cfg.threads,
        stall_timeout=cfg.stall_timeout,
    )
    summary = cache.last_build
    who = f"rank {ranks.rank}/{ranks.world_size}: " if ranks.enabled else ""
    print(
        f"{who}{cfg.dataset.name} ({', '.join(splits)}): {len(images)} images -> {cache.folder}: "
        f"computed {summary.computed}, already cached {summary.cached}, repaired {summary.repaired}"
    )


if __name__ == "__main__":
    main()
