"""Benchmark: SAM's ViT-B image encoder at 1024 px (what filling the embedding cache runs), bf16 against fp32.

The embedding cache (ssp_sam/data/embedding_cache.py) is filled by SAM's image encoder, once per
image. On a CPU with native bf16 (AMX or AVX512-BF16) the encoder can run under bf16 autocast.
This benchmark times the encoder on one preprocessed 480x640 picture (resized and padded to
1024x1024 as the cache does) in fp32 and in bf16, and in bf16 with segment_anything's own modules
where ours replace them (the baseline: its ``Attention``, which adds relative positions to
materialised scores, instead of ``FusedImageEncoderAttention``, ssp_sam/attention.py; its
``PatchEmbed``, whose permuted output keeps the residual stream strided, instead of
``ContiguousPatchEmbed``, ssp_sam/backbones/sam.py), alternated, after a warm-up of each, and checks
that bf16 keeps SAM's masks: SAM's own prompt encoder and mask decoder (fp32) are run on both
embeddings for a few single-point prompts, and each bf16 mask must have an IoU of at least 0.99
with the fp32 one. Random weights (no SAM weight file here): they do not change the speed, and
the masks of a random SAM still show whether bf16 changes the embedding enough to move them.

Goal (issue 12): on a CPU with native bf16, at most 1.5 s per image in bf16, masks IoU >= 0.99
against fp32. ViT-B at 1024 is slow on a small CPU, so the default is two timed rounds; the load
average at the start and at the end is recorded, since other processes inflate the times.

    python benchmarks/bench_sam_encoder.py --repeats 2
    python benchmarks/bench_sam_encoder.py --device cuda --repeats 10
    python benchmarks/bench_sam_encoder.py --quick      # the tiny SAM of configs/model/tiny.yaml: a smoke run

Prints a table and writes benchmarks/results/sam_encoder.json (``--quick``: sam_encoder_quick.json).
"""

from __future__ import annotations

import argparse
import os
from contextlib import nullcontext
import statistics
import sys

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from _common import add_allocator_flag, add_timing_arguments, finish_timing_arguments, bench_model_config, seconds, set_up_host_memory, write_result
from segment_anything.modeling.image_encoder import Attention as StockAttention
from segment_anything.modeling.image_encoder import PatchEmbed as StockPatchEmbed

from ssp_sam.attention import FusedImageEncoderAttention
from ssp_sam.backbones.sam import ContiguousPatchEmbed, build_sam
from ssp_sam.backbones.sam_frames import SAMImageTransform
from ssp_sam.engine.precision import Precision, cpu_capability, cpu_has_native_bf16, resolve_precision
from ssp_sam.predictor import resolve_device

GOAL_SECONDS, GOAL_MIN_IOU = 1.5, 0.99
STOCK = ", segment_anything modules"  # the variant with the stock modules (baseline of ours)
IMAGE_SIZE = (480, 640)  # (H, W), a typical COCO picture
POINT_PROMPTS = 5  # single positive clicks on the picture's shapes and background


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_timing_arguments(parser, 2, "smoke run: the tiny SAM of configs/model/tiny.yaml, one round", "sam_encoder")
    add_allocator_flag(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
    return finish_timing_arguments(parser, args)


def picture() -> tuple[np.ndarray, Tensor]:
    """A 480x640 RGB picture (smooth background, a few flat shapes) and (POINT_PROMPTS, 2) clicks (x, y) on it."""
    height, width = IMAGE_SIZE
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 200 // width + 30, y * 200 // height + 30, np.full_like(x, 120)], axis=-1).astype(np.uint8)
    clicks = []
    for _ in range(POINT_PROMPTS - 1):
        cx, cy, half = int(rng.integers(80, width - 80)), int(rng.integers(80, height - 80)), int(rng.integers(30, 70))
        rgb[cy - half : cy + half, cx - half : cx + half] = rng.integers(0, 256, 3)
        clicks.append((cx, cy))
    clicks.append((20, 20))  # the background
    return rgb, torch.tensor(clicks, dtype=torch.float32)


@torch.inference_mode()
def point_masks(sam, embedding: Tensor, clicks: Tensor, input_size: tuple[int, int]) -> Tensor:
    """SAM's single-mask output (fp32) for each click: (P, S, S) bool in the padded input frame."""
    scale = SAMImageTransform(sam.prompt_encoder.input_image_size[0]).input_size_for(IMAGE_SIZE)[0] / IMAGE_SIZE[0]
    points = (clicks * scale)[:, None, :].to(embedding.device)
    labels = torch.ones(points.shape[0], 1, device=embedding.device)
    sparse, dense = sam.prompt_encoder(points=(points, labels), boxes=None, masks=None)
    low_res, _ = sam.mask_decoder(
        image_embeddings=embedding.float(),
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
    size = sam.prompt_encoder.input_image_size[0]
    return F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)[:, 0, : input_size[0], : input_size[1]] > 0


class StockModulesIn:
    """Within: the encoder's attention and patch embedding are segment_anything's own modules again
    (only the classes change; same weights)."""

    STOCK_CLASSES = {FusedImageEncoderAttention: StockAttention, ContiguousPatchEmbed: StockPatchEmbed}

    def __init__(self, encoder: torch.nn.Module) -> None:
        self.swapped = [(m, type(m)) for m in encoder.modules() if type(m) in self.STOCK_CLASSES]

    def __enter__(self) -> None:
        for module, ours in self.swapped:
            module.__class__ = self.STOCK_CLASSES[ours]

    def __exit__(self, *exc_info) -> None:
        for module, ours in self.swapped:
            module.__class__ = ours


def mask_ious(a: Tensor, b: Tensor) -> list[float]:
    """IoU of each pair of (P, H, W) bool masks (1 when both are empty)."""
    intersection = (a & b).flatten(1).sum(-1).double()
    union = (a | b).flatten(1).sum(-1).double()
    return torch.where(union > 0, intersection / union.clamp_min(1), torch.ones_like(union)).tolist()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    load_at_start = round(os.getloadavg()[0], 2)
    host_memory = set_up_host_memory(device, args.default_allocator)
    capability = cpu_capability() if device.type == "cpu" else f"CUDA ({torch.cuda.get_device_name(device)})"
    low = resolve_precision("bf16", device, key="bf16 timing")
    precisions = {"fp32": Precision("fp32", "reference"), "bf16": low}

    config = bench_model_config(args.quick)
    torch.manual_seed(0)
    sam = build_sam(config.sam_variant, None, config.sam_custom).to(device).eval()
    rgb, clicks = picture()
    pixels, input_size = SAMImageTransform(sam.image_encoder.img_size)(rgb)
    pixels = pixels[None].to(device)
    name = "tiny SAM" if args.quick else "SAM ViT-B (random weights)"
    print(f"{name} at {sam.image_encoder.img_size} px, one image, {device} ({capability}), {args.repeats} round(s)")

    embeddings: dict[str, Tensor] = {}
    stock = StockModulesIn(sam.image_encoder)

    def encode(key: str) -> None:
        precision = precisions[key.split(",")[0]]
        with torch.inference_mode(), precision.autocast(device), stock if key.endswith(STOCK) else nullcontext():
            embeddings[key] = sam.image_encoder(pixels)

    variants = [*precisions, f"bf16{STOCK}"]
    for key in variants:  # warm-up: buffers, kernels
        encode(key)
    times: dict[str, list[float]] = {key: [] for key in variants}
    for round_index in range(args.repeats):
        for key in variants:
            times[key].append(seconds(lambda: encode(key), device))
        print(f"  round {round_index + 1}/{args.repeats} done", file=sys.stderr, flush=True)

    reference, low_embedding = embeddings["fp32"].float(), embeddings["bf16"].float()
    cosine = F.cosine_similarity(reference.flatten(1), low_embedding.flatten(1)).item()
    relative_error = ((low_embedding - reference).norm() / reference.norm()).item()
    ious = mask_ious(point_masks(sam, low_embedding, clicks, input_size), point_masks(sam, reference, clicks, input_size))
    rows = [
        {"precision": key, "seconds_per_image": statistics.median(runs), "runs_s": runs, "cpu_capability": capability}
        for key, runs in times.items()
    ]
    speed_up = rows[0]["seconds_per_image"] / rows[1]["seconds_per_image"]
    modules_speed_up = rows[2]["seconds_per_image"] / rows[1]["seconds_per_image"]
    print(f"{'variant':<34}  {'s / image':>9}  cpu")
    for row in rows:
        print(f"{row['precision']:<34}  {row['seconds_per_image']:>9.3f}  {row['cpu_capability']}")
    print(
        f"bf16 {speed_up:.2f}x fp32, our modules {modules_speed_up:.2f}x segment_anything's in bf16; embedding relative error {relative_error:.2e} (cosine {cosine:.6f}); "
        f"SAM masks of {len(ious)} point prompts, IoU bf16 vs fp32: min {min(ious):.4f}, mean {statistics.fmean(ious):.4f}"
    )
    judged = not args.quick and device.type == "cpu" and cpu_has_native_bf16()
    met = rows[1]["seconds_per_image"] <= GOAL_SECONDS and min(ious) >= GOAL_MIN_IOU
    print(
        f"goal: bf16 at most {GOAL_SECONDS:g} s per image with masks IoU >= {GOAL_MIN_IOU:g} on a CPU with native bf16 -> "
        f"{rows[1]['seconds_per_image']:.2f} s, IoU min {min(ious):.4f}: "
        + (("met" if met else "NOT met") if judged else "not judged (needs SAM ViT-B on a CPU with native bf16)")
    )
    write_result(
        args.out,
        benchmark="sam_encoder",
        goal=f"SAM ViT-B at 1024 px in bf16 on a CPU with native bf16: <= {GOAL_SECONDS:g} s per image, masks IoU >= {GOAL_MIN_IOU:g} vs fp32",
        goal_met=met if judged else None,
        setup={
            "host_memory": host_memory,
            "cpu_capability": capability,
            "model": "tiny SAM (configs/model/tiny.yaml)" if args.quick else "SAM vit_b (random weights)",
            "image_size_hw": list(IMAGE_SIZE),
            "sam_input_size": sam.image_encoder.img_size,
            "batch_size": 1,
            "bf16": vars(low),
            "point_prompts": clicks.tolist(),
            "repeats": args.repeats,
            "statistic": "median over rounds, variants alternated",
            "load_average_1min_at_start": load_at_start,
        },
        device=device,
        results={
            "timings": rows,
            "bf16_speed_up": speed_up,
            "speed_up_over_segment_anything_modules_bf16": modules_speed_up,
            "embedding_relative_error": relative_error,
            "embedding_cosine": cosine,
            "mask_iou_bf16_vs_fp32": ious,
        },
    )


if __name__ == "__main__":
    main()
