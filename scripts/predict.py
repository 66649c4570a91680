"""Segment referring expressions in one image and write masks, overlays and a summary.

    python scripts/predict.py image=scene.png 'expressions=[the red circle, the star left of the square]' out_dir=preds

Writes, per expression i: ``{i:02d}_mask.png`` (0/255), ``{i:02d}_overlay.png``, and
``summary.json`` with the COCO RLE, box (xyxy pixels), score and no-target decision of each.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image
from pycocotools import mask as mask_utils

from ssp_sam.cli import reports_errors
from ssp_sam.errors import ConfigError, ExpressionError
from ssp_sam.fileio import atomic_path, write_json
from ssp_sam.image_io import load_image
from ssp_sam.predictor import Predictor
from ssp_sam.visualize import overlay


def encode_rle(mask: np.ndarray) -> dict:
    """COCO RLE of an (H, W) bool mask, with the counts as a str (JSON-friendly)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _expressions(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, ListConfig)):
        return [str(v) if not isinstance(v, str) else v for v in value]
    raise ExpressionError(f"expressions: expected a list of strings, got {value!r}")


def _save_png(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


@hydra.main(config_path="../configs", config_name="predict", version_base="1.3")
@reports_errors
def main(cfg: DictConfig) -> None:
    expressions = _expressions(cfg.expressions)
    model_config = OmegaConf.to_container(cfg.model, resolve=True) if cfg.get("model") is not None else None
    if cfg.checkpoint is None and model_config is not None:
        raise ConfigError("checkpoint: give the checkpoint that goes with model=... (our directory or a released .pth)")
    image = load_image(cfg.image)
    predictor = Predictor.from_checkpoint(cfg.checkpoint, model_config, device=cfg.device)
    predictions = predictor.predict(image, expressions)

    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"image": str(cfg.image), "checkpoint": str(cfg.checkpoint or "default"), "predictions": []}
    for index, prediction in enumerate(predictions):
        mask_file, overlay_file = f"{index:02d}_mask.png", f"{index:02d}_overlay.png"
        _save_png(Image.fromarray(prediction.mask.astype(np.uint8) * 255), out_dir / mask_file)
        caption = f"{prediction.expression}" + ("  [no target]" if prediction.no_target else "")
        _save_png(overlay(image, prediction.mask, prediction.box, caption), out_dir / overlay_file)
        summary["predictions"].append(
            {
                "expression": prediction.expression,
                "mask": mask_file,
                "overlay": overlay_file,
                "rle": encode_rle(prediction.mask),
                "box_xyxy": [round(float(v), 2) for v in prediction.box],
                "score": round(prediction.score, 4),
                "no_target": prediction.no_target,
                "area": int(prediction.mask.sum()),
            }
        )
        status = "no target" if prediction.no_target else f"{int(prediction.mask.sum())} px"
        print(f"[{index:02d}] {prediction.expression!r}: {status}")
    write_json(out_dir / "summary.json", summary)
    print(f"wrote {len(predictions)} masks and overlays to {out_dir}/")


if __name__ == "__main__":
    main()
