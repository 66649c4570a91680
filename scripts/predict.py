"""Segment referring expressions in one image and write masks, overlays and a summary.

    python scripts/predict.py image=scene.png 'expressions=[the red circle, the star left of the square]' out_dir=preds

Writes, per expression i: ``{i:02d}_mask.png`` (0/255), ``{i:02d}_overlay.png``; then
``summary.json`` with the COCO RLE, box (xyxy pixels), score and no-target decision of each, and
``predictions.jsonl`` in the simple JSONL dataset format. The outputs of an earlier run in the same
``out_dir`` are replaced (other files there are left alone). The photo is turned as its EXIF
orientation says, so the masks match the picture as viewers show it.

With an OVSS checkpoint (CAT-Seg, CAT-Seg + SAM vote, SAM-MI) it segments a class list instead:

    python scripts/predict.py checkpoint=runs/ovss/best image=scene.png 'classes=[red circle, blue square]' out_dir=preds

and writes ``label_map.png``, ``overlay.png`` (with a legend), ``mask_NN_<class>.png`` per class and
``summary.json`` (``ssp_sam/ovss/predict.py``).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from ssp_sam.cli import model_settings, reports_errors
from ssp_sam.config import model_overrides_added
from ssp_sam.errors import ConfigError, ExpressionError
from ssp_sam.export import write_predictions
from ssp_sam.image_io import load_image
from ssp_sam.outputs import check_output_dir
from ssp_sam.ovss.engine.checkpoint import is_ovss_checkpoint, read_ovss_checkpoint_config
from ssp_sam.ovss.predict import DEFAULT_OVSS_CHECKPOINT, predict_to_folder
from ssp_sam.predictor import Predictor, resolve_device


def _expressions(value) -> list[str]:
    """The expressions as given; anything but text (Hydra reads null, true, 1.5, [a, b] unquoted as such) is refused."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, ListConfig)):
        for index, item in enumerate(value):
            if not isinstance(item, str):
                shown = OmegaConf.to_container(item) if isinstance(item, (ListConfig, DictConfig)) else item
                raise ExpressionError(
                    f"expressions: item {index} is {shown!r}, not text (unquoted, Hydra reads null, true, numbers and "
                    f"[...] as such); put each expression in double quotes, e.g. 'expressions=[\"2 apples\", \"a, b\"]'"
                )
        if len(value) == 0:
            raise ExpressionError("expressions: give at least one expression")
        return list(value)
    shown = OmegaConf.to_container(value) if isinstance(value, DictConfig) else value
    raise ExpressionError(f"expressions: expected a list of strings, got {shown!r}")


@hydra.main(config_path="../configs", config_name="predict", version_base="1.3")
@reports_errors
def main(cfg: DictConfig) -> None:
    check_output_dir(cfg.out_dir, "out_dir", required=True)  # null or empty: refused before any model loads
    resolve_device(cfg.device)  # mps, meta, a missing GPU: refused before the model loads
    if cfg.checkpoint is not None and is_ovss_checkpoint(cfg.checkpoint):
        return _predict_ovss(cfg, cfg.checkpoint)
    if cfg.checkpoint is None and cfg.classes is not None and is_ovss_checkpoint(DEFAULT_OVSS_CHECKPOINT):
        return _predict_ovss(cfg, DEFAULT_OVSS_CHECKPOINT)  # the shipped ShapeWorld SAM-MI
    if cfg.classes is not None:
        if cfg.checkpoint is None:
            raise ConfigError("classes: segmenting classes needs an OVSS checkpoint (checkpoint=<a directory of an ovss_* run>)")
        read_ovss_checkpoint_config(cfg.checkpoint)  # says why it is none: not found, no config.json, another format
    expressions = _expressions(cfg.expressions)
    model_config = model_settings(cfg)  # model.<key>=v changes the checkpoint's config
    image = load_image(cfg.image, exif_orientation=True)  # a bad file fails before the model is loaded
    if cfg.checkpoint is None:  # the demo's model: say so, a photo is not what it knows
        print("checkpoint: not given, using the shipped ShapeWorld model (trained on synthetic shape scenes only; "
              "give checkpoint=... for real images)", file=sys.stderr)
    predictor = Predictor.from_checkpoint(cfg.checkpoint, model_config, device=cfg.device)
    predictions = predictor.predict(cfg.image, expressions)  # by path: errors name the file

    write_predictions(image, predictions, cfg.out_dir, str(cfg.image), str(cfg.checkpoint or "default"))
    for index, prediction in enumerate(predictions):
        status = "no target" if prediction.no_target else f"{int(prediction.mask.sum())} px"
        print(f"[{index:02d}] {prediction.expression!r}: {status}")
    print(f"wrote {len(predictions)} masks and overlays to {cfg.out_dir}/")


def _predict_ovss(cfg: DictConfig, checkpoint) -> None:
    if not OmegaConf.is_missing(cfg, "expressions"):
        raise ConfigError("expressions: an OVSS checkpoint segments classes; give classes=[...] instead")
    if cfg.get("model") is not None:
        raise ConfigError("model: for an OVSS checkpoint change its model config with ovss.model={...}")
    if cfg.ovss.model is not None and not isinstance(cfg.ovss.model, DictConfig):
        raise ConfigError(f"ovss.model: expected changes to the model config such as '{{points: grid}}', got {cfg.ovss.model!r}")
    model_changes = OmegaConf.to_container(cfg.ovss.model, resolve=True) if cfg.ovss.model is not None else {}
    classes = cfg.classes
    if isinstance(classes, ListConfig):
        classes = [v if isinstance(v, str) or v is None else str(v) for v in classes]  # Hydra reads [1, 2] as numbers
    summary = predict_to_folder(
        checkpoint, cfg.image, classes, cfg.out_dir, cfg.device,
        cfg.ovss.inference, cfg.ovss.overlap, cfg.ovss.none_below, model_changes,
        cfg.ovss.precision,
    )  # fmt: skip
    for entry in summary["classes"]:
        print(f"[{entry['index']:02d}] {entry['name']!r}: {entry['pixels']} px")
    if summary["none_pixels"]:
        print(f"none of the classes: {summary['none_pixels']} px")
    print(f"wrote the label map, the overlay and {len(summary['classes'])} class masks to {cfg.out_dir}/ ({summary['inference']} inference)")


if __name__ == "__main__":
    sys.argv[1:] = model_overrides_added(sys.argv[1:])  # model.no_target_pixels=N without model=<preset>
    main()
