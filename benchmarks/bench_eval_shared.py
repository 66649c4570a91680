"""Benchmark: evaluating images with 8 expressions each, encoders shared per image or run per expression.

A small synthetic dataset in the JSONL format (ssp_sam/data/jsonl.py) is written to a temporary
folder: 480x640 images with 8 coloured shapes, one expression and one mask PNG per shape. SSP-SAM-224
(CLIP ViT-B/16 at 224, SAM ViT-B at 1024; random weights, which do not change the speed) evaluates
it without an embedding cache, so SAM's image encoder runs in every encoder pass, as in the
release. Two ways, timed in the same run after a warm-up:

    shared      ``evaluate(...)`` as implemented: one pass of the CLIP and SAM image encoders per
                image, the text encoder and decoder batched over the image's 8 expressions;
    per-sample  the release's test loop: for every expression, ``Predictor.encode_image`` then
                ``Predictor.predict([expression])`` -- the whole pipeline alone -- scored with the
                same RES metrics.

Both must give the same metrics. Goal: at least 5x more images per second with shared encoders.
On a CPU both paths run with freed host memory kept, as scripts/eval.py does
(``--default-allocator``: glibc's defaults).

    python benchmarks/bench_eval_shared.py
    python benchmarks/bench_eval_shared.py --device cuda --images 20 --repeats 3
    python benchmarks/bench_eval_shared.py --quick      # tiny model, 2 images: a smoke run

Prints a table and writes benchmarks/results/eval_shared.json (``--quick``: eval_shared_quick.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

from _common import REPO, RESULTS, add_allocator_flag, seconds, set_up_host_memory, write_result
from ssp_sam.config import model_config_from
from ssp_sam.data.jsonl import read_jsonl_file
from ssp_sam.data.records import ReferringDataset
from ssp_sam.data.shapeworld import COLORS  # ShapeWorld's palette: eight well-separated colours
from ssp_sam.engine.evaluator import evaluate
from ssp_sam.metrics import RESMetrics
from ssp_sam.model import build_model
from ssp_sam.predictor import Predictor, resolve_device

GOAL_RATIO = 5.0
SENTENCES_PER_IMAGE = 8
IMAGE_SIZE = (480, 640)  # (H, W), a typical COCO picture
SHAPES = ("square", "circle", "triangle")
# The two paths decode the same sentences, batched or one by one: every sentence's mask IoU and
# box IoU agree to these (batched float sums may flip a pixel whose logit is ~0: a mask IoU moves
# by about 1 / union per flipped pixel).
IOU_ATOL, BOX_IOU_ATOL = 1e-3, 1e-4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--images", type=int, default=4, help="images evaluated, 8 expressions each")
    parser.add_argument("--repeats", type=int, default=1, help="timed evaluations per path (the median is reported)")
    parser.add_argument("--quick", action="store_true", help="smoke run: the tiny model of configs/model/tiny.yaml, 2 images")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default benchmarks/results/eval_shared[_quick].json)")
    add_allocator_flag(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.repeats = 2, 1
    if args.images < 1 or args.repeats < 1:
        parser.error("--images and --repeats must be at least 1")
    if args.out is None:
        args.out = RESULTS / ("eval_shared_quick.json" if args.quick else "eval_shared.json")
    return args


def write_dataset(folder: Path, name: str, n_images: int, seed: int) -> ReferringDataset:
    """``n_images`` pictures with 8 shapes each and ``<folder>/<name>.jsonl``, one line per shape."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    height, width = IMAGE_SIZE
    cell_h, cell_w = height // 2, width // 4  # 8 shapes on a 2 x 4 grid, one per cell: no overlaps
    lines = []
    for image_index in range(n_images):
        background = rng.integers(90, 170, (height, width, 3), dtype=np.uint8)
        picture = Image.fromarray(background)
        draw = ImageDraw.Draw(picture)
        kinds = rng.choice(len(COLORS) * len(SHAPES), SENTENCES_PER_IMAGE, replace=False)
        for cell, kind in enumerate(kinds):
            color, shape = list(COLORS)[kind // len(SHAPES)], SHAPES[kind % len(SHAPES)]
            radius = int(rng.integers(30, min(cell_h, cell_w) // 2 - 5))
            cx = (cell % 4) * cell_w + cell_w // 2
            cy = (cell // 4) * cell_h + cell_h // 2
            box = (cx - radius, cy - radius, cx + radius, cy + radius)
            mask = Image.new("L", (width, height), 0)
            for canvas, fill in ((draw, COLORS[color]), (ImageDraw.Draw(mask), 255)):
                if shape == "square":
                    canvas.rectangle(box, fill=fill)
                elif shape == "circle":
                    canvas.ellipse(box, fill=fill)
                else:
                    canvas.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
            mask_name = f"masks/{name}_{image_index}_{cell}.png"
            mask.save(folder / mask_name)
            side = "left" if cell % 4 < 2 else "right"
            row = "top" if cell < 4 else "bottom"
            lines.append(
                {"image": f"images/{name}_{image_index}.png", "expression": f"the {color} {shape} at the {row} {side}", "mask": mask_name}
            )
        picture.save(folder / f"images/{name}_{image_index}.png")
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return read_jsonl_file(path, name=name, split=name)


def build_predictor(quick: bool, device: torch.device) -> Predictor:
    """SSP-SAM-224 with SAM ViT-B (or the tiny model), random weights, SAM image encoder included."""
    if quick:
        config = model_config_from(OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / "tiny.yaml")))
    else:
        config = model_config_from({"name": "bench", "sam_variant": "vit_b", "random_encoders": True})
    torch.manual_seed(0)
    return Predictor(build_model(config), device=device)


def evaluate_shared(predictor: Predictor, dataset: ReferringDataset) -> tuple[dict, list[dict]]:
    """(metrics, per-sentence records) of ``evaluate`` as implemented."""
    result = evaluate(predictor, dataset, progress=False)
    return result.metrics, result.per_sample


def evaluate_per_sample(predictor: Predictor, dataset: ReferringDataset) -> tuple[dict, list[dict]]:
    """The release's loop: every sentence alone through the whole pipeline, scored like ``evaluate``."""
    metrics = RESMetrics()
    for position, (sample, index) in enumerate(dataset.per_sentence()):
        encoded = predictor.encode_image(sample.image_path)
        prediction = predictor.predict(encoded, [sample.expressions[index]])[0]
        metrics.update(prediction.mask, sample.mask(), prediction.box, sample.union_box_xyxy(), sample_id=position)
    return metrics.compute(), metrics.per_sample()


def compare_records(shared: list[dict], per_sample: list[dict]) -> dict:
    """Largest per-sentence differences between the two paths (mask IoU, box IoU, pixels of I and U)."""
    if len(shared) != len(per_sample):
        raise RuntimeError(f"the two paths scored {len(shared)} and {len(per_sample)} sentences")

    def largest(key: str) -> float:
        return max(abs(a[key] - b[key]) for a, b in zip(shared, per_sample))

    differences = {"IoU": largest("IoU"), "box_IoU": largest("box_IoU"), "I_pixels": largest("I"), "U_pixels": largest("U")}
    differences["equal"] = differences["IoU"] <= IOU_ATOL and differences["box_IoU"] <= BOX_IOU_ATOL
    return differences


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    host_memory = set_up_host_memory(device, args.default_allocator)
    predictor = build_predictor(args.quick, device)
    model_name = "tiny" if args.quick else "SSP-SAM-224, SAM ViT-B"
    print(
        f"{model_name} ({predictor.model.sam_image_size} px, no cache), {args.images} images x "
        f"{SENTENCES_PER_IMAGE} expressions, {device}, {args.repeats} repeat(s)"
    )
    with tempfile.TemporaryDirectory(prefix="bench_eval_shared_") as folder:
        warm_up = write_dataset(Path(folder), "warmup", 1, seed=1)
        dataset = write_dataset(Path(folder), "bench", args.images, seed=0)
        # Warm-up: first calls allocate buffers and pick kernels.
        evaluate_shared(predictor, warm_up)
        evaluate_per_sample(predictor, ReferringDataset("warmup", "warmup", "res", list(warm_up)[:1]))

        paths = {"shared": evaluate_shared, "per_sample": evaluate_per_sample}
        timings: dict[str, list[float]] = {path: [] for path in paths}
        outcomes: dict[str, tuple[dict, list[dict]]] = {}

        def run(path: str) -> None:
            outcomes[path] = paths[path](predictor, dataset)

        for _ in range(args.repeats):
            for path in paths:
                timings[path].append(seconds(lambda: run(path), device))
                print(f"  {path} done", file=sys.stderr, flush=True)
    differences = compare_records(outcomes["shared"][1], outcomes["per_sample"][1])
    metrics, records = outcomes["shared"]
    # How much the check covers: with random weights many masks are empty and many boxes miss.
    informative = sum(1 for record in records if record["I"] > 0 or record["box_IoU"] > 0)

    shared_s, per_sample_s = statistics.median(timings["shared"]), statistics.median(timings["per_sample"])
    rows = [
        {
            "path": path,
            "seconds": total,
            "images_per_s": args.images / total,
            "seconds_per_expression": total / (args.images * SENTENCES_PER_IMAGE),
            "encoder_passes": args.images * (1 if path == "shared" else SENTENCES_PER_IMAGE),
            "runs_s": timings[path],
        }
        for path, total in (("shared", shared_s), ("per_sample", per_sample_s))
    ]
    ratio = per_sample_s / shared_s
    print(f"{'path':<11}  {'encoder passes':>14}  {'seconds':>8}  {'images/s':>9}  {'s/expression':>12}")
    for row in rows:
        print(
            f"{row['path']:<11}  {row['encoder_passes']:>14d}  {row['seconds']:>8.2f}  "
            f"{row['images_per_s']:>9.3f}  {row['seconds_per_expression']:>12.3f}"
        )
    print(
        f"{'same' if differences['equal'] else 'DIFFERENT'} results on both paths: per sentence, mask IoU within "
        f"{differences['IoU']:.1e} (I within {differences['I_pixels']:g} px, U within {differences['U_pixels']:g} px), "
        f"box IoU within {differences['box_IoU']:.1e}; {informative} of {len(records)} sentences have a non-zero "
        "mask intersection or box IoU"
    )
    goal_met = not args.quick and differences["equal"] and ratio >= GOAL_RATIO
    print(
        f"goal: at least {GOAL_RATIO:g}x more images/s with shared encoders -> {ratio:.2f}x, "
        f"{'met' if goal_met else 'NOT met'}{' (not judged for --quick)' if args.quick else ''}"
    )
    write_result(
        args.out,
        benchmark="eval_shared",
        goal=f"images/s with shared encoder passes / images/s per sample >= {GOAL_RATIO:g} ({SENTENCES_PER_IMAGE} expressions per image)",
        goal_met=goal_met,
        setup={
            "host_memory": host_memory,
            "model": "tiny (configs/model/tiny.yaml)" if args.quick else "ssp_sam_224, SAM vit_b (random weights)",
            "sam_image_size": predictor.model.sam_image_size,
            "embedding_cache": False,
            "images": args.images,
            "image_size_hw": list(IMAGE_SIZE),
            "expressions_per_image": SENTENCES_PER_IMAGE,
            "repeats": args.repeats,
            "statistic": "median over repeats",
        },
        device=device,
        results={
            "paths": rows,
            "ratio": ratio,
            "metrics": metrics,
            "largest_per_sentence_differences": differences,
            "sentences_with_nonzero_intersection_or_box_iou": informative,
        },
    )
    if not differences["equal"]:
        raise SystemExit(f"the two paths disagree beyond mask IoU {IOU_ATOL:g} / box IoU {BOX_IOU_ATOL:g}: the timings compare different computations")


if __name__ == "__main__":
    main()
