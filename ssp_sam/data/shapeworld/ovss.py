"""ShapeWorld-OVSS: the scenes of ShapeWorld-Ref as a zero-shot semantic-segmentation benchmark.

```
OUT/shapeworld_ovss/dataset.json                                   # classes, unseen classes, background rule
OUT/shapeworld_ovss/images/{split}/shapeworld_{split}_{index:06d}.png
OUT/shapeworld_ovss/annotations/{split}/shapeworld_{split}_{index:06d}.png  # label maps
OUT/manifest.json                                                  # written last (shared with res / gres)
```
Label value = position of the object's "{colour} {shape}" in the 48-name class list (colours in
the spec's order, then shapes). Background pixels are 255 (ignored, ``background="ignore"``) or
the 49th class "background", value 48 (``background="class"``); dataset.json says which.

Open-vocabulary split: the 12 pairs (colour i, shape j) with (i + j) mod 4 == 0 are unseen. They
never appear in train: a training object drawn as an unseen pair draws its shape and colour again
(``generate_scene(exclude=...)``), which keeps the object count uniform in 2..6 and the training
classes uniform over the 36 seen ones (rejecting whole scenes instead would favour scenes with
few objects). Val and test scenes are ShapeWorld-Ref's own, with every class.
Every image is a function of (seed, split, index), so a split is deterministic given (seed, split, count).
"""

from __future__ import annotations

import os
from collections import Counter
from contextlib import nullcontext
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ...errors import ConfigError
from .dataset import SPEC_VERSION, NImages, _write_atomic, _write_json, check_generation_arguments, write_manifest
from .scene import CLASS_NAMES, COLOR_NAMES, SHAPES, generate_scene

DATASET_DIR = "shapeworld_ovss"
IGNORE_VALUE = 255
BACKGROUND_MODES = ("ignore", "class")
UNSEEN_CLASSES = tuple(
    f"{color} {shape}"
    for i, color in enumerate(COLOR_NAMES)
    for j, shape in enumerate(SHAPES)
    if (i + j) % 4 == 0
)
TRAIN_EXCLUDED = frozenset(UNSEEN_CLASSES)


def class_names(background: str) -> tuple[str, ...]:
    """The label classes: the 48 colour-shape names, plus "background" (value 48) in mode "class"."""
    if background not in BACKGROUND_MODES:
        raise ConfigError(f"background: expected one of {', '.join(BACKGROUND_MODES)}, got {background!r}")
    return CLASS_NAMES + (("background",) if background == "class" else ())


def label_map(scene, background: str) -> np.ndarray:
    """uint8 (256, 256): each object's class index on its pixels, the background value elsewhere."""
    labels = np.full(scene.image.shape[:2], IGNORE_VALUE if background == "ignore" else len(CLASS_NAMES), dtype=np.uint8)
    for obj in scene.objects:  # objects never overlap (v1), so the order does not matter
        labels[obj.mask] = obj.category_index
    return labels


def _save_png(path: Path, array: np.ndarray) -> None:
    _write_atomic(path, lambda file: Image.fromarray(array).save(file, format="PNG"))


def build_ovss_sample(seed: int, background: str, out: Path, job: tuple[str, int]) -> dict:
    """Generate image ``job = (split, index)``, write its PNG and label PNG, return its object classes."""
    split, index = job
    scene = generate_scene(seed, split, index, exclude=TRAIN_EXCLUDED if split == "train" else frozenset())
    _save_png(out / "images" / split / scene.file_name, scene.image)
    _save_png(out / "annotations" / split / scene.file_name, label_map(scene, background))
    return {"split": split, "classes": [obj.category for obj in scene.objects]}


def _counts(samples: list[dict]) -> dict[str, dict]:
    counts: dict[str, Counter] = {}
    for sample in samples:
        split = counts.setdefault(sample["split"], Counter(images=0, objects=0, unseen_objects=0))
        split["images"] += 1
        split["objects"] += len(sample["classes"])
        split["unseen_objects"] += sum(name in TRAIN_EXCLUDED for name in sample["classes"])
    return {split: dict(counter) for split, counter in counts.items()}


def generate_ovss_dataset(
    out: str | os.PathLike, n_images: NImages, seed: int, background: str = "ignore", workers: int = 0, progress: bool = True
) -> Path:
    """Write ShapeWorld-OVSS into ``out`` (layout in the module docstring) and return ``out``.

    ``n_images``: an int (every split) or {split: count}. ``workers`` > 0 uses processes; the files
    are identical either way. An OUT holding res / gres data must have been made with the same seed
    and counts (the manifest is shared).
    """
    names = class_names(background)
    out, counts, seed, workers, _, tasks = check_generation_arguments(out, n_images, seed, workers)
    manifest_path = out / "manifest.json"
    dataset_dir = out / DATASET_DIR
    for split in counts:
        (dataset_dir / "images" / split).mkdir(parents=True, exist_ok=True)
        (dataset_dir / "annotations" / split).mkdir(parents=True, exist_ok=True)

    jobs = [(split, index) for split, count in counts.items() for index in range(count)]
    build = partial(build_ovss_sample, seed, background, dataset_dir)
    bar = tqdm(total=len(jobs), unit="img", desc="ShapeWorld-OVSS", disable=not progress)
    with bar, (Pool(workers) if workers else nullcontext()) as pool:
        samples = []
        for sample in pool.imap(build, jobs, chunksize=16) if workers else map(build, jobs):
            samples.append(sample)
            bar.update()

    _write_json(
        dataset_dir / "dataset.json",
        {
            "spec_version": SPEC_VERSION,
            "classes": list(names),
            "background": background,
            "ignore_value": IGNORE_VALUE,
            "unseen_classes": list(UNSEEN_CLASSES),
            "seen_classes": [name for name in CLASS_NAMES if name not in TRAIN_EXCLUDED],
            "unseen_rule": "(colour index + shape index) mod 4 == 0; never in train (objects redrawn)",
        },
        indent=2,
    )
    tasks["ovss"] = {"dataset": DATASET_DIR, "background": background, "counts": _counts(samples)}
    write_manifest(manifest_path, seed, counts, tasks)
    return out
