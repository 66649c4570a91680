"""Compute the SAM image embeddings of a dataset once and store them in the embedding cache.

    python scripts/cache_embeddings.py dataset=refcoco sam_checkpoint=weights/sam_vit_h_4b8939.pth
    python scripts/cache_embeddings.py dataset=shapeworld checkpoint=runs/tiny/best   # our checkpoint's SAM encoder

The cache lives in ``<cache_dir>/<first 16 hex digits of the encoder fingerprint>/`` and is keyed by
image file, so RefCOCO, RefCOCO+ and RefCOCOg share the COCO embeddings. Only missing and damaged
entries are computed: re-running after an interruption resumes, and re-running on a complete cache
just verifies it. Prints one summary line; our errors print ``error: ...`` and exit with status 2.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from ssp_sam.backbones.sam import SAMImageTransform, build_sam
from ssp_sam.checkpoint import is_own_checkpoint, load_model
from ssp_sam.cli import reports_errors
from ssp_sam.data.embedding_cache import build_cache, image_key, sam_encoder_fingerprint
from ssp_sam.data.records import select_splits
from ssp_sam.data.registry import read_splits
from ssp_sam.errors import ConfigError
from ssp_sam.predictor import resolve_device


def check_weights_source(cfg: DictConfig) -> None:
    """Fail before reading any data when no SAM encoder weights are named."""
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


def dataset_images(dataset_cfg: DictConfig, splits: str | ListConfig | None) -> tuple[list[str], dict[str, Path]]:
    """The chosen splits (default all) and their images as {image_key: path}, in dataset order."""
    available = read_splits(dataset_cfg)
    requested = [splits] if isinstance(splits, str) else (list(splits) if splits is not None else None)
    chosen = select_splits(requested, list(available), f"dataset {dataset_cfg.name}")
    images = {image_key(path): path for split in chosen for path in available[split].image_paths()}
    return chosen, images


def load_encoder(cfg: DictConfig):
    """(SAM image encoder, its cache fingerprint) from our checkpoint or from SAM's weight file."""
    if cfg.checkpoint is not None:
        overrides = {"sam_checkpoint": cfg.sam_checkpoint} if cfg.sam_checkpoint is not None else None
        model = load_model(cfg.checkpoint, overrides)
        return model.sam_image_encoder, sam_encoder_fingerprint(model.sam_image_encoder, model.config.sam_checkpoint)
    custom = OmegaConf.to_container(cfg.sam_custom, resolve=True) if cfg.sam_custom is not None else None
    encoder = build_sam(cfg.sam_variant, cfg.sam_checkpoint, custom=custom, parts=("image_encoder",)).image_encoder
    return encoder, sam_encoder_fingerprint(encoder, cfg.sam_checkpoint)


@hydra.main(config_path="../configs", config_name="cache_embeddings", version_base="1.3")
@reports_errors
def main(cfg: DictConfig) -> None:
    check_weights_source(cfg)
    splits, images = dataset_images(cfg.dataset, cfg.splits)
    encoder, fingerprint = load_encoder(cfg)
    cache = build_cache(
        cfg.cache_dir,
        images,
        encoder,
        SAMImageTransform(encoder.img_size),
        fingerprint,
        batch_size=cfg.batch_size,
        device=resolve_device(cfg.device),
        dtype=cfg.dtype,
        progress=cfg.progress,
        verify=cfg.verify,
        threads=cfg.threads,
    )
    summary = cache.last_build
    print(
        f"{cfg.dataset.name} ({', '.join(splits)}): {len(images)} images -> {cache.folder}: "
        f"computed {summary.computed}, already cached {summary.cached}, repaired {summary.repaired}"
    )


if __name__ == "__main__":
    main()
