"""Zero-shot pixel accuracy of an OVSS model's cost volume on a dataset split: does its CLIP tell the classes apart?

    python scripts/ovss_zeroshot.py ovss_model=shapeworld ovss_dataset.root=data/sw_ovss_train [ovss_model.clip.dense=catseg|surgery]
        [ovss_model.clip.checkpoint=FILE] [ovss_model.clip.templates=...] [max_images=60] [out=zeroshot.json]

Each image is resized to the model's input, its cost volume (CLIP's dense features against the class
names, averaged over the templates) upsampled to the label, and the argmax class compared with the label
over the labelled pixels (ssp_sam/ovss/zero_shot.py). Prints the accuracy and chance (1 / classes).
"""

from __future__ import annotations

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm import tqdm

from ssp_sam.cli import reports_errors
from ssp_sam.engine.host_memory import shared_with_forked_workers
from ssp_sam.engine.reporting import command_line
from ssp_sam.errors import ConfigError, first_line
from ssp_sam.fileio import write_json
from ssp_sam.outputs import check_output_file
from ssp_sam.ovss.build import build_ovss_model
from ssp_sam.ovss.data import load_ovss_dataset
from ssp_sam.ovss.engine.data import EvaluationImages, as_list
from ssp_sam.ovss.model_config import ovss_config_from
from ssp_sam.ovss.zero_shot import pixel_hits, zero_shot_costs
from ssp_sam.predictor import resolve_device


@hydra.main(config_path="../configs", config_name="ovss_zeroshot", version_base="1.3")
@reports_errors
def main(cfg: DictConfig) -> None:
    check_output_file(cfg.out, "out")
    for key, least in (("batch_size", 1), ("workers", 0)):
        if not isinstance(cfg[key], int) or cfg[key] < least:
            raise ConfigError(f"{key}: must be an integer >= {least}, got {cfg[key]!r}")
    if cfg.max_images is not None and (not isinstance(cfg.max_images, int) or cfg.max_images < 1):
        raise ConfigError(f"max_images: must be an integer >= 1 or null, got {cfg.max_images!r}")
    if cfg.threads is not None:
        torch.set_num_threads(int(cfg.threads))
    try:
        model_cfg = OmegaConf.to_container(cfg.ovss_model, resolve=True)
        dataset_cfg = OmegaConf.to_container(cfg.ovss_dataset, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{exc.full_key or 'config'}: cannot be resolved ({first_line(exc)})") from None
    config = ovss_config_from(model_cfg, variant="catseg")  # the cost volume is CAT-Seg's: no SAM
    dataset = load_ovss_dataset(dataset_cfg)
    device = resolve_device(cfg.device)
    catseg = build_ovss_model(config).catseg.to(device).eval()

    count = len(dataset) if cfg.max_images is None else min(cfg.max_images, len(dataset))
    loader = torch.utils.data.DataLoader(
        EvaluationImages(dataset, list(range(count))), batch_size=cfg.batch_size, collate_fn=as_list, num_workers=cfg.workers
    )
    size = (config.image_size, config.image_size)
    totals = torch.zeros(2, dtype=torch.int64, device=device)  # correct, labelled pixels
    with torch.inference_mode(), tqdm(total=count, desc="zero-shot", unit="img") as progress, \
            shared_with_forked_workers(enabled=cfg.workers > 0):
        text = catseg.encode_classes(dataset.class_names)
        for items in loader:
            images = torch.cat([
                F.interpolate(item["image"][None].float(), size=size, mode="bilinear", align_corners=False) for item in items
            ]).to(device)
            for costs, item in zip(zero_shot_costs(catseg, images, text), items):
                totals += pixel_hits(costs, item["label"])
            progress.update(len(items))
    correct, labelled = totals.tolist()
    if labelled == 0:
        raise ConfigError(f"ovss_dataset: the first {count} images of {dataset.name} {dataset.split} have no labelled pixel")
    accuracy, classes = correct / labelled, len(dataset.class_names)
    print(
        f"{dataset.name} {dataset.split}, {count} images: zero-shot pixel accuracy {accuracy:.4f} over {labelled} labelled pixels "
        f"(chance 1/{classes} = {1 / classes:.4f}); clip.dense={config.clip.dense}, templates={config.clip.templates}, "
        f"resolution {config.clip.resolution}"
    )
    if cfg.out is not None:
        write_json(cfg.out, {
            "pixel_accuracy": accuracy, "correct_pixels": correct, "labelled_pixels": labelled, "images": count,
            "classes": classes, "chance": 1 / classes, "dataset": str(dataset_cfg["name"]), "split": str(dataset_cfg["split"]),
            "ovss_model": config.to_dict(), "command": command_line(),
        })
        print(f"wrote {cfg.out}")


if __name__ == "__main__":
    main()
