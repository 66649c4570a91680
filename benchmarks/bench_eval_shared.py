"""Benchmark: evaluation from cached SAM embeddings, ours against the release's per-sample path.

A small synthetic dataset in the JSONL format (ssp_sam/data/jsonl.py) is written to a temporary
folder: 480x640 images with 8 coloured shapes, one expression and one mask PNG per shape, and an
embedding cache holding one SAM embedding per image (random (256, 64, 64) tensors: the SAM
encoder's weights do not change the speed, and neither path runs it, as the release does not at
evaluation). SSP-SAM-224 (CLIP ViT-B/16 at 224, SAM ViT-B's decoder; random weights, the
released design) evaluates it two ways, timed in the same run in alternated rounds:

    ours         ``evaluate(...)`` with the cache and scripts/eval.py's defaults (configs/eval.yaml:
                 several images per encoder call, sentences decoded together, images read ahead
                 by data-loader workers, the text-feature cache), precision ``--precision``
                 (default ``auto``: bf16 on CUDA and on CPUs with native bf16, fp32 elsewhere);
    per sample   the release's test loop (batch 1, benchmarks/release_baseline.py, fp32): for
                 every expression, the image read and letterboxed, its cached SAM embedding read,
                 the release's whole forward alone (CLIP image and text encoders, per-sample
                 similarity loop, SAM's decoder called per image), scored with the same metrics.

Both paths score masks at the image's resolution with the RES metrics (``protocol=standard``),
so the scoring costs the same on both. Before timing, ours in fp32 and the per-sample path must
give the same IoU and box IoU for every sentence; ours in the timed precision is compared with
ours in fp32 (per-sentence mask IoU difference). Goal (issue 12): at least 10x more images per
second than the release's per-sample path.

    python benchmarks/bench_eval_shared.py
    python benchmarks/bench_eval_shared.py --images 8 --repeats 3
    python benchmarks/bench_eval_shared.py --device cuda --images 20 --repeats 3
    python benchmarks/bench_eval_shared.py --quick      # tiny model, 2 images: a smoke run

On a CPU both paths run with freed host memory kept, as scripts/eval.py does
(``--default-allocator``: glibc's defaults). Prints a table and writes
benchmarks/results/eval_shared.json (``--quick``: eval_shared_quick.json).
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

from _common import REPO, add_allocator_flag, add_timing_arguments, finish_timing_arguments, bench_model_config, seconds, set_up_host_memory, write_result
from release_baseline import ReleaseComputation
from ssp_sam.backbones.clip_tokenizer import CLIPTokenizer
from ssp_sam.backbones.sam_frames import SAMImageTransform, padded_frame_to_original
from ssp_sam.data.embedding_cache import EmbeddingCache, EncoderIdentity
from ssp_sam.data.jsonl import read_jsonl_file
from ssp_sam.data.records import ReferringDataset
from ssp_sam.data.shapeworld import COLORS  # ShapeWorld's palette: eight well-separated colours
from ssp_sam.engine.evaluator import evaluate
from ssp_sam.engine.precision import PRECISIONS, Precision, cpu_capability, resolve_precision
from ssp_sam.image_io import load_image
from ssp_sam.letterbox import letterbox_image
from ssp_sam.metrics import RESMetrics
from ssp_sam.model import SSPSAM, build_model
from ssp_sam.predictor import resolve_device

GOAL_RATIO = 10.0
EVAL_DEFAULTS = OmegaConf.load(REPO / "configs" / "eval.yaml")  # max_batch, images_per_batch, workers of scripts/eval.py
SENTENCES_PER_IMAGE = 8
IMAGE_SIZE = (480, 640)  # (H, W), a typical COCO picture
SHAPES = ("square", "circle", "triangle")
# Ours in fp32 and the per-sample path compute the same function, batched or one by one: every
# sentence's mask IoU and box IoU agree to these (batched float sums may flip a pixel whose logit
# is ~0: a mask IoU moves by about 1 / union per flipped pixel).
IOU_ATOL, BOX_IOU_ATOL = 1e-3, 1e-4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_timing_arguments(parser, 1, "smoke run: the tiny model of configs/model/tiny.yaml, 2 images", "eval_shared")
    parser.add_argument("--images", type=int, default=4, help="images evaluated, 8 expressions each")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS, help="our precision (eval.precision)")
    add_allocator_flag(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.repeats = 2, 1
    if args.images < 1:
        parser.error("--images must be at least 1")
    return finish_timing_arguments(parser, args)


def write_dataset(folder: Path, name: str, n_images: int, seed: int) -> ReferringDataset:
    """``n_images`` pictures with 8 shapes each and ``<folder>/<name>.jsonl``, one line (a distinct sentence) per shape."""
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
            # the picture's number keeps every sentence distinct, as in a real split: evaluate()'s text cache would
            # otherwise skip the text tower for repeats that the per-sample path runs again
            expression = f"the {color} {shape} at the {row} {side} of picture {image_index + 1}"
            lines.append({"image": f"images/{name}_{image_index}.png", "expression": expression, "mask": mask_name})
        picture.save(folder / f"images/{name}_{image_index}.png")
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return read_jsonl_file(path, name=name, split=name)


def build_bench_model(quick: bool, device: torch.device) -> SSPSAM:
    """SSP-SAM-224 with SAM ViT-B's decoder (or the tiny model), random weights, the released design, no SAM encoder."""
    torch.manual_seed(0)
    model = build_model(bench_model_config(quick, release_quirks=True), with_sam_image_encoder=False)
    return model.to(device).eval()


def fill_cache(folder: Path, model: SSPSAM, datasets: list[ReferringDataset]) -> EmbeddingCache:
    """An embedding cache in ``folder`` with a random SAM embedding for every image of ``datasets``."""
    identity = EncoderIdentity(variant=model.config.sam_variant, weights="random (bench_eval_shared)", image_size=model.sam_image_size)
    cache = EmbeddingCache(folder / "cache", identity, image_roots=[folder])
    shape = (model.mask_head.embed_dim, *model.mask_head.prompt_encoder.image_embedding_size)
    generator = torch.Generator().manual_seed(2)
    for image in sorted({path for dataset in datasets for path in dataset.image_paths()}):
        cache.write(cache.slot(image), torch.randn(shape, generator=generator))
    return cache


def evaluate_ours(model: SSPSAM, dataset: ReferringDataset, cache: EmbeddingCache, precision: Precision) -> list[dict]:
    """Per-sentence records of ``evaluate`` as scripts/eval.py runs it by default (configs/eval.yaml), in ``precision``."""
    result = evaluate(
        model, dataset, cache=cache, device=model.device, progress=False, protocol="standard", precision=precision,
        max_batch=int(EVAL_DEFAULTS.max_batch), images_per_batch=int(EVAL_DEFAULTS.images_per_batch), workers=int(EVAL_DEFAULTS.workers),
    )
    return result.per_sample


@torch.no_grad()
def evaluate_per_sample(release: ReleaseComputation, dataset: ReferringDataset, cache: EmbeddingCache) -> list[dict]:
    """The release's test loop: one expression per forward, everything recomputed, scored like ``evaluate``."""
    model = release.model
    device = model.device
    tokenizer = CLIPTokenizer(model.clip.context_length, model.config.append_period)
    resize = SAMImageTransform(model.sam_image_size)
    metrics = RESMetrics()
    for position, (sample, index) in enumerate(dataset.per_sentence()):
        rgb = load_image(sample.image_path)
        clip_pixels, letterbox = letterbox_image(rgb, model.clip.image_size)
        embedding = cache.get(sample.image_path).to(device, torch.float32)[None]
        tokens = tokenizer([sample.expressions[index]]).to(device)
        mask_logits, boxes = release.forward(clip_pixels[None].to(device), tokens, embedding)
        logits = padded_frame_to_original(mask_logits, resize.input_size_for(rgb.shape[:2]), rgb.shape[:2], model.sam_image_size)
        box = letterbox.box_to_image(boxes.cpu())[0]
        metrics.update((logits[0, 0] > 0).cpu().numpy(), sample.mask(), box.numpy(), sample.union_box_xyxy(), sample_id=position)
    return metrics.per_sample()


def largest_differences(a: list[dict], b: list[dict]) -> dict:
    """Largest per-sentence differences between two evaluations (mask IoU, box IoU, pixels of I and U)."""
    if len(a) != len(b):
        raise RuntimeError(f"the two evaluations scored {len(a)} and {len(b)} sentences")

    def largest(key: str) -> float:
        return max(abs(x[key] - y[key]) for x, y in zip(a, b))

    return {"IoU": largest("IoU"), "box_IoU": largest("box_IoU"), "I_pixels": largest("I"), "U_pixels": largest("U")}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    host_memory = set_up_host_memory(device, args.default_allocator)
    capability = cpu_capability() if device.type == "cpu" else f"CUDA ({torch.cuda.get_device_name(device)})"
    precision = resolve_precision(args.precision, device, key="--precision")
    fp32 = Precision("fp32", "the equivalence check")
    model = build_bench_model(args.quick, device)
    release = ReleaseComputation(model)
    model_name = "tiny" if args.quick else "SSP-SAM-224, SAM ViT-B decoder"
    print(
        f"{model_name} ({model.sam_image_size} px, cached SAM embeddings), {args.images} images x {SENTENCES_PER_IMAGE} "
        f"expressions, {device} ({capability}), ours in {precision.name} ({precision.reason}), {args.repeats} round(s)"
    )
    with tempfile.TemporaryDirectory(prefix="bench_eval_shared_") as folder:
        warm_up = write_dataset(Path(folder), "warmup", 1, seed=1)
        dataset = write_dataset(Path(folder), "bench", args.images, seed=0)
        cache = fill_cache(Path(folder), model, [warm_up, dataset])
        evaluate_ours(model, warm_up, cache, precision)  # first calls allocate buffers and pick kernels
        evaluate_per_sample(release, ReferringDataset("warmup", "warmup", "res", list(warm_up)[:1]), cache)

        # Same function first: ours in fp32 against the release's per-sample path.
        reference = evaluate_ours(model, dataset, cache, fp32)
        per_sample_records = evaluate_per_sample(release, dataset, cache)
        equivalence = largest_differences(reference, per_sample_records)
        equivalence["equal"] = equivalence["IoU"] <= IOU_ATOL and equivalence["box_IoU"] <= BOX_IOU_ATOL
        print(
            f"{'same' if equivalence['equal'] else 'DIFFERENT'} results, ours fp32 against per sample: per sentence, mask IoU "
            f"within {equivalence['IoU']:.1e} (I within {equivalence['I_pixels']:g} px, U within {equivalence['U_pixels']:g} px), "
            f"box IoU within {equivalence['box_IoU']:.1e}"
        )
        if not equivalence["equal"]:
            raise SystemExit(
                f"ours (fp32) and the per-sample path disagree beyond mask IoU {IOU_ATOL:g} / box IoU {BOX_IOU_ATOL:g}: "
                "the timings would compare different computations"
            )

        paths = {
            "ours": lambda: evaluate_ours(model, dataset, cache, precision),
            "per_sample": lambda: evaluate_per_sample(release, dataset, cache),
        }
        timings: dict[str, list[float]] = {path: [] for path in paths}
        records: dict[str, list[dict]] = {}
        for round_index in range(args.repeats):
            for path, run in paths.items():
                timings[path].append(seconds(lambda: records.__setitem__(path, run()), device))
            print(f"  round {round_index + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    precision_drift = largest_differences(records["ours"], reference)
    precision_drift["mean_IoU_difference"] = statistics.fmean(abs(x["IoU"] - y["IoU"]) for x, y in zip(records["ours"], reference))
    informative = sum(1 for record in reference if record["I"] > 0 or record["box_IoU"] > 0)

    ours_s, per_sample_s = statistics.median(timings["ours"]), statistics.median(timings["per_sample"])
    rows = [
        {
            "path": path,
            "precision": precision.name if path == "ours" else "fp32",
            "seconds": total,
            "images_per_s": args.images / total,
            "seconds_per_expression": total / (args.images * SENTENCES_PER_IMAGE),
            "clip_image_encoder_passes": args.images * (1 if path == "ours" else SENTENCES_PER_IMAGE),
            "runs_s": timings[path],
            "cpu_capability": capability,
        }
        for path, total in (("ours", ours_s), ("per_sample", per_sample_s))
    ]
    ratio = per_sample_s / ours_s
    print(f"{'path':<11}  {'precision':>9}  {'CLIP passes':>11}  {'seconds':>8}  {'images/s':>9}  {'s/expression':>12}  cpu")
    for row in rows:
        print(
            f"{row['path']:<11}  {row['precision']:>9}  {row['clip_image_encoder_passes']:>11d}  {row['seconds']:>8.2f}  "
            f"{row['images_per_s']:>9.3f}  {row['seconds_per_expression']:>12.3f}  {row['cpu_capability']}"
        )
    if precision.name != "fp32":
        print(
            f"ours in {precision.name} against ours in fp32: per sentence, mask IoU within {precision_drift['IoU']:.1e} "
            f"(mean {precision_drift['mean_IoU_difference']:.1e}), box IoU within {precision_drift['box_IoU']:.1e}"
        )
    goal_met = not args.quick and ratio >= GOAL_RATIO
    print(
        f"goal: at least {GOAL_RATIO:g}x the images/s of the release's per-sample path -> {ratio:.2f}x, "
        f"{'met' if goal_met else 'NOT met'}{' (not judged for --quick)' if args.quick else ''}"
    )
    write_result(
        args.out,
        benchmark="eval_shared",
        goal=f"images/s of evaluate() with cached SAM embeddings / images/s of the release's per-sample path >= {GOAL_RATIO:g}",
        goal_met=goal_met,
        setup={
            "host_memory": host_memory,
            "cpu_capability": capability,
            "model": "tiny (configs/model/tiny.yaml)" if args.quick else "ssp_sam_224, SAM vit_b decoder (random weights)",
            "precision_ours": vars(precision),
            "precision_per_sample": "fp32",
            "sam_image_size": model.sam_image_size,
            "embedding_cache": "random embeddings, read by both paths",
            "images": args.images,
            "image_size_hw": list(IMAGE_SIZE),
            "expressions_per_image": SENTENCES_PER_IMAGE,
            "protocol": "standard",
            "evaluate_settings": {key: EVAL_DEFAULTS[key] for key in ("max_batch", "images_per_batch", "workers")},
            "repeats": args.repeats,
            "statistic": "median over rounds, paths alternated",
        },
        device=device,
        results={
            "paths": rows,
            "ratio": ratio,
            "equivalence_ours_fp32_vs_per_sample": equivalence,
            "precision_vs_fp32": precision_drift,
            "sentences_with_nonzero_intersection_or_box_iou": informative,
        },
    )


if __name__ == "__main__":
    main()
