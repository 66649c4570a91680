"""Benchmark: one image, K expressions, with the frozen image encoders shared or run per expression.

SSP-SAM-224 (CLIP ViT-B/16 at 224, SAM ViT-B by default; random weights, which do not change the
speed) is timed two ways in the same run, after a warm-up, for K = 1, 4 and 16 expressions:

    shared    Predictor.predict(image, K expressions): CLIP's and SAM's image encoders run once,
              everything after them runs batched over the K expressions;
    separate  for each expression: Predictor.encode_image(image), then Predictor.predict(encoded,
              [expression]) -- the whole pipeline once per expression.

Goal: at K = 16 the shared path takes at least 8x less time per expression.

    python benchmarks/bench_shared_encoders.py --repeats 3
    python benchmarks/bench_shared_encoders.py --device cuda --repeats 10
    python benchmarks/bench_shared_encoders.py --quick      # tiny SAM, one repeat: a smoke run

Prints a table and writes benchmarks/results/shared_encoders.json (``--quick``:
shared_encoders_quick.json) with the timings and the machine they were measured on.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np
import torch
from omegaconf import OmegaConf

from _common import REPO, add_allocator_flag, add_timing_arguments, finish_timing_arguments, seconds, set_up_host_memory, write_result
from ssp_sam.config import model_config_from
from ssp_sam.model import build_model
from ssp_sam.predictor import Predictor, resolve_device

EXPRESSION_COUNTS = (1, 4, 16)
GOAL_COUNT, GOAL_RATIO = 16, 8.0
IMAGE_SIZE = (480, 640)  # (H, W), a typical COCO picture
EXPRESSIONS = [
    "the man in the red shirt",
    "woman on the left holding an umbrella",
    "the dog lying next to the bench",
    "second car from the right",
    "the tallest tree",
    "a white plate with a sandwich on it",
    "the person partly hidden behind the door",
    "blue bicycle leaning on the wall",
    "the smaller of the two cats",
    "bottom left corner chair",
    "the laptop whose screen is open",
    "guy in the middle wearing glasses",
    "the cup nearest to the camera",
    "red and white striped umbrella",
    "the window above the door",
    "a child sitting on the grass",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_timing_arguments(parser, 3, "smoke run: --sam-variant custom --repeats 1", "shared_encoders")
    parser.add_argument(
        "--sam-variant",
        default="vit_b",
        choices=("vit_b", "vit_l", "vit_h", "custom"),
        help="SAM image encoder; custom = the tiny SAM of configs/model/tiny.yaml",
    )
    add_allocator_flag(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.sam_variant, args.repeats = "custom", 1
    return finish_timing_arguments(parser, args)


def build_predictor(sam_variant: str, device: torch.device) -> Predictor:
    """SSP-SAM-224 with the requested SAM variant and random weights."""
    overrides = {"name": "bench", "sam_variant": sam_variant, "random_encoders": True}
    if sam_variant == "custom":
        overrides["sam_custom"] = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / "tiny.yaml").sam_custom)
    torch.manual_seed(0)
    return Predictor(build_model(model_config_from(overrides)), device=device)


def measure(predictor: Predictor, image: np.ndarray, repeats: int) -> list[dict]:
    """Per-expression seconds of both paths for every K (medians over ``repeats`` runs)."""

    def shared(expressions: list[str]) -> None:
        predictor.predict(image, expressions)

    def separate(expressions: list[str]) -> None:
        for expression in expressions:
            predictor.predict(predictor.encode_image(image), [expression])

    # Warm-up: first calls allocate buffers and pick kernels.
    shared(EXPRESSIONS[:2])
    separate(EXPRESSIONS[:1])

    rows = []
    for count in EXPRESSION_COUNTS:
        expressions = EXPRESSIONS[:count]
        shared_runs, separate_runs = [], []
        for _ in range(repeats):
            shared_runs.append(seconds(lambda: shared(expressions), predictor.device))
            separate_runs.append(seconds(lambda: separate(expressions), predictor.device))
        shared_each = statistics.median(shared_runs) / count
        separate_each = statistics.median(separate_runs) / count
        rows.append(
            {
                "expressions": count,
                "shared_s_per_expression": shared_each,
                "separate_s_per_expression": separate_each,
                "ratio": separate_each / shared_each,
                "shared_runs_s": shared_runs,
                "separate_runs_s": separate_runs,
            }
        )
        print(f"  K={count:<2d} done", file=sys.stderr, flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'K':>3}  {'shared s/expr':>14}  {'separate s/expr':>16}  {'ratio':>6}")
    for row in rows:
        print(
            f"{row['expressions']:>3}  {row['shared_s_per_expression']:>14.3f}  "
            f"{row['separate_s_per_expression']:>16.3f}  {row['ratio']:>5.1f}x"
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    host_memory = set_up_host_memory(device, args.default_allocator)
    predictor = build_predictor(args.sam_variant, device)
    image = np.random.default_rng(0).integers(0, 256, (*IMAGE_SIZE, 3), dtype=np.uint8)
    print(f"SSP-SAM-224, SAM {args.sam_variant} ({predictor.model.sam_image_size} px), {device}, {args.repeats} repeat(s)")

    rows = measure(predictor, image, args.repeats)
    print_table(rows)
    goal_ratio = next(row["ratio"] for row in rows if row["expressions"] == GOAL_COUNT)
    goal_met = goal_ratio >= GOAL_RATIO
    print(f"goal: at K={GOAL_COUNT} at least {GOAL_RATIO:g}x less time per expression -> {goal_ratio:.1f}x, {'met' if goal_met else 'NOT met'}")

    write_result(
        args.out,
        benchmark="shared_encoders",
        goal=f"at K={GOAL_COUNT}, separate / shared time per expression >= {GOAL_RATIO:g}",
        goal_met=goal_met,
        setup={
            "host_memory": host_memory,
            "model": "ssp_sam_224 (random weights)",
            "sam_variant": args.sam_variant,
            "sam_image_size": predictor.model.sam_image_size,
            "image_size_hw": list(IMAGE_SIZE),
            "repeats": args.repeats,
            "statistic": "median over repeats, divided by K",
        },
        device=device,
        results=rows,
    )


if __name__ == "__main__":
    main()
