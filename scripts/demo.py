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

Before any work, ``--out`` and the checkpoint are checked. Each run replaces ``<out>/data`` with a fresh
split, but only a ``data`` folder the demo made (it holds the demo's ``DEMO_MARK`` file): ``--out .``
in a repository whose ``data/`` holds training sets stops with an error, and deletes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from ssp_sam.cli import reports_errors
from ssp_sam.data.registry import load_dataset
from ssp_sam.data.shapeworld import UNSEEN_CLASSES, dataset_config, generate_dataset, generate_scene
from ssp_sam.data.shapeworld.dataset import DATASET_DIRS
from ssp_sam.engine.evaluator import evaluate
from ssp_sam.engine.reporting import command_line, console_tables, make_tables, write_results
from ssp_sam.errors import ConfigError
from ssp_sam.export import save_png, write_predictions
from ssp_sam.fileio import write_json
from ssp_sam.image_io import load_image
from ssp_sam.outputs import check_output_dir
from ssp_sam.ovss.engine.checkpoint import is_ovss_checkpoint, read_ovss_checkpoint_config
from ssp_sam.ovss.predict import DEFAULT_OVSS_CHECKPOINT, predict_to_folder
from ssp_sam.predictor import DEFAULT_CHECKPOINT, Predictor
from ssp_sam.visualize import contact_sheet, overlay

# Seeds of the shipped model's training data are listed in docs/shapeworld_model.md; this one is not among them.
DEMO_SEED = 20261122


# Written into <out>/data before the split is generated: the folder is the demo's to replace. A run
# replaces no folder without it, since <out>/data may be someone's training data (--out . in the repository).
DEMO_MARK = "made_by_scripts_demo.json"


def _made_by_an_earlier_demo(data: Path) -> bool:
    """A ``data`` folder a demo from before ``DEMO_MARK`` left: nothing but what the ShapeWorld generator
    writes (images, manifest, the RES and GRES folders), made with the demo's seed and a test split only."""
    if not {path.name for path in data.iterdir()} <= {"images", "manifest.json", *DATASET_DIRS.values()}:
        return False
    try:
        manifest = json.loads((data / "manifest.json").read_text())
        return manifest["seed"] == DEMO_SEED and set(manifest["n_images"]) == {"test"}
    except (OSError, ValueError, KeyError, TypeError):
        return False


def check_demo_data(data: Path) -> bool:
    """Whether ``data`` holds an earlier demo's split that a new run replaces (False: nothing there).

    Raises:
        ConfigError: ``data`` exists and is not the demo's (a file, a link, or a folder without
            ``DEMO_MARK`` that is not an earlier demo's split): the demo never deletes it.
    """
    if not os.path.lexists(data):
        return False
    if data.is_symlink() or not data.is_dir():
        raise ConfigError(f"--out: {data} exists and is not a folder the demo made (a {'link' if data.is_symlink() else 'file'}); "
                          f"the demo deletes nothing of yours: give another --out")
    if (data / DEMO_MARK).is_file() or not any(data.iterdir()) or _made_by_an_earlier_demo(data):
        return True  # the demo's (an empty folder holds nothing to lose either)
    raise ConfigError(f"--out: {data} exists and was not made by the demo (it has no {DEMO_MARK}); the demo replaces only "
                      f"its own data folder and deletes nothing of yours: give another --out, or remove {data} yourself")


def fresh_demo_data(data: Path) -> None:
    """Make ``data`` an empty folder marked as the demo's, replacing an earlier demo's (never anything else,
    see :func:`check_demo_data`). The mark is written before the split, so an interrupted run's folder is
    still recognised and replaced by the next."""
    if check_demo_data(data):
        shutil.rmtree(data)
    data.mkdir(parents=True)
    write_json(data / DEMO_MARK, {"made_by": "scripts/demo.py", "seed": DEMO_SEED,
                                  "note": "this folder is deleted and made afresh by every run of scripts/demo.py"})


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


@reports_errors
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    parser.add_argument("--n-images", type=int, default=40)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--ovss-checkpoint", type=Path, default=DEFAULT_OVSS_CHECKPOINT)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    # Everything that can be wrong with the arguments is found before anything is deleted or computed.
    check_output_dir(args.out, "--out")
    if args.n_images < 1:
        raise ConfigError(f"--n-images: give at least 1 image, got {args.n_images}")
    data = args.out / "data"
    check_demo_data(data)
    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device)  # a missing or wrong checkpoint stops here

    fresh_demo_data(data)
    print(f"[1/4] generating a fresh ShapeWorld-Ref test split ({args.n_images} images, seed {DEMO_SEED})")
    for task in ("res", "gres"):
        generate_dataset(data, task, {"test": args.n_images}, seed=DEMO_SEED)

    print(f"[2/4] evaluating {args.checkpoint}")
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
    sys.exit(main())
