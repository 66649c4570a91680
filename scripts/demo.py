"""The README's main job: ShapeWorld-Ref end to end on the shipped model, in a few minutes on a CPU.

    python scripts/demo.py [--out demo_out] [--n-images 40] [--checkpoint DIR] [--device auto]

1. Generates a fresh ShapeWorld-Ref test split (RES and GRES) with a seed no training run uses.
2. Evaluates the model on both and prints the paper-style table, with a breakdown per
   expression kind (A attribute, L location, R relation, M multi-target, N no-target).
3. Segments one test image for a few expressions, one of which names nothing in the image, and
   writes masks, overlays, summary.json and predictions.jsonl.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from ssp_sam.data.registry import load_dataset
from ssp_sam.data.shapeworld import dataset_config, generate_dataset
from ssp_sam.engine.evaluator import evaluate
from ssp_sam.engine.reporting import command_line, console_tables, make_tables, write_results
from ssp_sam.errors import SSPSAMError
from ssp_sam.export import write_predictions
from ssp_sam.image_io import load_image
from ssp_sam.predictor import DEFAULT_CHECKPOINT, Predictor

# Seeds of the shipped model's training data are listed in docs/shapeworld_model.md; this one is not among them.
DEMO_SEED = 20261122


def pick_example(dataset) -> tuple[Path, list[str]]:
    """An image with a no-target sentence, and up to four of its sentences (one of them no-target)."""
    by_image: dict[Path, list[tuple[str, str]]] = {}
    for sample, index in dataset.per_sentence():
        kind = sample.sentence_meta(index).get("kind", "?")
        by_image.setdefault(sample.image_path, []).append((kind, sample.expressions[index]))
    for path, sentences in by_image.items():
        kinds = {kind for kind, _ in sentences}
        if "N" in kinds and len(kinds) >= 3:
            chosen, seen = [], set()
            for kind, text in sentences:
                if kind not in seen:
                    seen.add(kind)
                    chosen.append(text)
            return path, chosen[:4]
    path, sentences = next(iter(by_image.items()))
    return path, [text for _, text in sentences[:4]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    parser.add_argument("--n-images", type=int, default=40)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    data = args.out / "data"
    shutil.rmtree(data, ignore_errors=True)
    print(f"[1/3] generating a fresh ShapeWorld-Ref test split ({args.n_images} images, seed {DEMO_SEED})")
    for task in ("res", "gres"):
        generate_dataset(data, task, {"test": args.n_images}, seed=DEMO_SEED)

    print(f"[2/3] evaluating {args.checkpoint}")
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

    image_path, expressions = pick_example(gres_dataset)
    print(f"\n[3/3] segmenting {image_path.name} for {len(expressions)} expressions")
    image = load_image(image_path)
    predictions = predictor.predict(image, expressions)
    out_dir = args.out / "predictions"
    write_predictions(image, predictions, out_dir, str(image_path), str(args.checkpoint))
    for index, prediction in enumerate(predictions):
        status = "no target" if prediction.no_target else f"{int(prediction.mask.sum())} px, box {[round(v, 1) for v in prediction.box.tolist()]}"
        print(f"  [{index:02d}] {prediction.expression!r}: {status}")
    print(f"\nmasks, overlays, summary.json and predictions.jsonl in {out_dir}/")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SSPSAMError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
