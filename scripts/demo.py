"""The README's main job: ShapeWorld-Ref end to end on the shipped model, in a few minutes on a CPU.

    python scripts/demo.py [--out demo_out] [--n-images 40] [--checkpoint DIR] [--device auto]

1. Generates a fresh ShapeWorld-Ref test split (RES and GRES) with a seed no training run uses.
2. Evaluates the model on both and prints the paper-style table, with a breakdown per
   expression kind (A attribute, L location, R relation, M multi-target, N no-target).
3. Segments one test image for one expression of each kind (A, L, R, M and the no-target N), says
   for each whether it shows the annotated object(s) (IoU >= 0.5; for N: "no target" said), and
   writes masks, overlays, summary.json, predictions.jsonl and overview.png (the overlays side by side).
4. With the shipped ShapeWorld SAM-MI (checkpoints/shapeworld_ovss, open-vocabulary segmentation;
   skipped when it is absent): segments a fresh ShapeWorld-OVSS scene into its classes, one of
   them never seen in training, plus one class that is not in the picture, and writes the label map,
   the overlay with its legend and the per-class masks to <out>/ovss/.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from ssp_sam.data.registry import load_dataset
from ssp_sam.data.shapeworld import UNSEEN_CLASSES, dataset_config, generate_dataset, generate_scene
from ssp_sam.engine.evaluator import evaluate
from ssp_sam.engine.reporting import command_line, console_tables, make_tables, write_results
from ssp_sam.errors import SSPSAMError
from ssp_sam.export import save_png, write_predictions
from ssp_sam.image_io import load_image
from ssp_sam.ovss.engine.checkpoint import is_ovss_checkpoint, read_ovss_checkpoint_config
from ssp_sam.ovss.predict import DEFAULT_OVSS_CHECKPOINT, predict_to_folder
from ssp_sam.predictor import DEFAULT_CHECKPOINT, Predictor
from ssp_sam.visualize import contact_sheet, overlay

# Seeds of the shipped model's training data are listed in docs/shapeworld_model.md; this one is not among them.
DEMO_SEED = 20261122


KIND_ORDER = ("A", "L", "R", "M", "N")  # attribute, location, relation, multi-target, no-target
OVERVIEW_FILE = "overview.png"  # step 3's overlays side by side, each captioned with its kind and verdict


def pick_example(dataset) -> tuple[Path, list[tuple[str, str, np.ndarray]]]:
    """The first image with a sentence of every kind (else the one with the most kinds), and one sentence
    per kind in KIND_ORDER: (kind, expression, annotated mask (H, W) bool; all False for no-target)."""
    by_image: dict[Path, dict[str, tuple[str, str, object]]] = {}
    for sample, index in dataset.per_sentence():
        kind = sample.sentence_meta(index).get("kind", "?")
        by_image.setdefault(sample.image_path, {}).setdefault(kind, (kind, sample.expressions[index], sample))
    path = max(by_image, key=lambda key: len(set(by_image[key]) & set(KIND_ORDER)))  # the first of the most
    ordered = sorted(by_image[path].values(), key=lambda entry: KIND_ORDER.index(entry[0]) if entry[0] in KIND_ORDER else 99)
    return path, [(kind, text, sample.mask()) for kind, text, sample in ordered]


def agreement(prediction, annotated: np.ndarray) -> tuple[bool, str]:
    """Whether a prediction shows the annotated object(s) (IoU >= 0.5; for no-target: "no target" said),
    and the words the demo prints."""
    if not annotated.any():
        return prediction.no_target, "annotated: no target"
    union = np.logical_or(prediction.mask, annotated).sum()
    iou = float(np.logical_and(prediction.mask, annotated).sum() / union)
    return iou >= 0.5, f"IoU {iou:.2f} with the annotated mask"


def segment_one_of_each_kind(predictor, image_path: Path, examples, out_dir: Path, checkpoint: str) -> list[bool]:
    """Step 3: ``examples`` (from :func:`pick_example`) on ``image_path``; prints each verdict and writes the
    export of :func:`write_predictions` plus ``OVERVIEW_FILE`` (the overlays side by side, without boxes,
    each captioned with its kind, sentence, answer and verdict). Returns whether each one was right."""
    image = load_image(image_path)
    predictions = predictor.predict(image, [text for _, text, _ in examples])
    write_predictions(image, predictions, out_dir, str(image_path), checkpoint)
    verdicts, tiles = [], []
    for index, (prediction, (kind, _, annotated)) in enumerate(zip(predictions, examples)):
        said = "no target" if prediction.no_target else f"{int(prediction.mask.sum())} px"
        status = said if prediction.no_target else f"{said}, box {[round(v, 1) for v in prediction.box.tolist()]}"
        correct, words = agreement(prediction, annotated)
        verdicts.append(correct)
        verdict = "right" if correct else "WRONG"
        print(f"  [{index:02d}] {kind} {prediction.expression!r}: {status} ({words}: {verdict})")
        tiles.append(overlay(image, prediction.mask, None, f"{kind}: {prediction.expression} -> {said} ({verdict})"))
    save_png(contact_sheet(tiles), out_dir / OVERVIEW_FILE)
    print(f"{sum(verdicts)} of {len(examples)} right; masks, overlays, summary.json, predictions.jsonl and {OVERVIEW_FILE}"
          f" (all {len(examples)} overlays side by side) in {out_dir}/")
    return verdicts


def ovss_example(out_dir: Path, checkpoint: Path, device: str = "auto") -> dict | None:
    """Step 4: one ShapeWorld-OVSS test scene of the demo's seed (the first with 3 or more classes, one unseen)
    segmented into its classes plus one absent unseen class (and "background" when the model has that class;
    otherwise pixels below probability 0.5 for every class are "none"). None when ``checkpoint`` is no OVSS model."""
    if not is_ovss_checkpoint(checkpoint):
        print(f"\n[4/4] skipped: no OVSS checkpoint at {checkpoint}")
        return None
    vocabulary = read_ovss_checkpoint_config(checkpoint).get("class_names") or []
    for index in range(1000):
        scene = generate_scene(DEMO_SEED, "test", index)
        present = list(dict.fromkeys(obj.category for obj in scene.objects))
        if len(present) >= 3 and set(present) & set(UNSEEN_CLASSES):
            break
    absent = next(name for name in UNSEEN_CLASSES if name not in present)
    has_background = "background" in vocabulary
    classes = present + [absent] + (["background"] if has_background else [])
    out_dir.mkdir(parents=True, exist_ok=True)
    image_path = out_dir / "scene.png"
    Image.fromarray(scene.image).save(image_path)
    print(f"\n[4/4] open-vocabulary segmentation of {image_path} with {checkpoint}")
    summary = predict_to_folder(checkpoint, image_path, classes, out_dir, device, none_below=None if has_background else 0.5)
    for entry in summary["classes"]:
        tag = " (unseen in training)" if entry["name"] in UNSEEN_CLASSES else ""
        tag += " (not in the picture)" if entry["name"] == absent else ""
        print(f"  [{entry['index']:02d}] {entry['name']!r}{tag}: {entry['pixels']} px")
    print(f"label map, overlay with legend, per-class masks and summary.json in {out_dir}/")
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    parser.add_argument("--n-images", type=int, default=40)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--ovss-checkpoint", type=Path, default=DEFAULT_OVSS_CHECKPOINT)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    data = args.out / "data"
    shutil.rmtree(data, ignore_errors=True)
    print(f"[1/4] generating a fresh ShapeWorld-Ref test split ({args.n_images} images, seed {DEMO_SEED})")
    for task in ("res", "gres"):
        generate_dataset(data, task, {"test": args.n_images}, seed=DEMO_SEED)

    print(f"[2/4] evaluating {args.checkpoint}")
    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device)
    records, gres_dataset = [], None
    for task in ("res", "gres"):
        config = dataset_config(data, task)
        dataset = load_dataset(config)
        gres_dataset = dataset if task == "gres" else gres_dataset
        result = evaluate(predictor, dataset)
        print(f"\n{config['name']} / test ({result.n_images} images, {result.n_samples} expressions)")
        print(console_tables(result))
        records.append(
            write_results(
                args.out / f"metrics_{config['name']}_test.json", result, config, predictor.model.config.name,
                args.checkpoint, command_line(), label="shipped ShapeWorld model",
            )
        )
    markdown, _ = make_tables(records, compact=True)
    print("\nPaper-style table (mIoU for RES; gIoU / cIoU / N-acc for GRES):\n")
    print(markdown)

    image_path, examples = pick_example(gres_dataset)
    print(f"\n[3/4] segmenting {image_path.name} for one expression of each kind")
    segment_one_of_each_kind(predictor, image_path, examples, args.out / "predictions", str(args.checkpoint))
    ovss_example(args.out / "ovss", args.ovss_checkpoint, args.device)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SSPSAMError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
