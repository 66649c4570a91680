"""Check that a dataset is laid out as ssp_sam expects, before training or evaluating on it.

    python scripts/check_data.py dataset=refcoco dataset.root=/path/to/data [dataset.split=testA] [all_splits=true]
    python scripts/check_data.py ovss_dataset=ade20k_150 ovss_dataset.root=/path/to/data   (OVSS: configs/ovss_dataset/)

Reads the annotation files exactly as training does (so missing files, refs pointing at unknown
annotations, empty sentence lists are reported by the readers, all at once), prints the splits found
with their sizes, then checks one split (or all): every image file present, decodable to its end
(a truncated file shows only when decoded) and of the size the annotations state, every GT mask
decodable, every polygon inside its image. Every problem found is reported, not only the first.
Exit status: 0 fine, 1 problems found, 2 usage error.

The config is composed with Hydra's compose API rather than ``@hydra.main`` so that usage errors
get their own exit status and nothing is written to the working directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException
from tqdm import tqdm

from ssp_sam.data.masks import read_image_size
from ssp_sam.data.records import ReferringDataset
from ssp_sam.data.registry import chosen_split, read_splits
from ssp_sam.errors import ConfigError, DatasetError, ImageError, SSPSAMError
from ssp_sam.image_io import load_image
from ssp_sam.ovss.data.check import check_ovss_dataset

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2


def _examples(items: list, count: int) -> str:
    shown = ", ".join(str(item) for item in items[:count])
    return shown + (", ..." if len(items) > count else "")


class Report:
    """Prints check results as they come and counts the problems."""

    def __init__(self, examples: int) -> None:
        self.examples = examples
        self.problems = 0

    def ok(self, message: str) -> None:
        print(f"  ok: {message}")

    def note(self, message: str, items: list) -> None:
        print(f"  note: {message}: {_examples(items, self.examples)}")

    def problem(self, message: str, items: list | None = None) -> None:
        self.problems += 1
        print(f"  PROBLEM: {message}" + (f": {_examples(items, self.examples)}" if items else ""))


def check_images(dataset: ReferringDataset, report: Report) -> set[Path]:
    """Every image file present, decodable and of the annotated size; returns the missing and unreadable ones."""
    stated_size = {}
    for sample in dataset:
        stated_size.setdefault(sample.image_path, sample.size_hint)
    missing, unreadable, wrong_size = [], [], []
    for path, size in tqdm(stated_size.items(), desc=f"images {dataset.split}", file=sys.stderr, disable=None, leave=False):
        if not path.is_file():
            missing.append(path)
            continue
        try:
            actual = read_image_size(path)
            load_image(path)  # the header alone does not show a truncated file
        except ImageError:
            unreadable.append(path)
            continue
        if size is not None and tuple(size) != actual:
            wrong_size.append(f"{path} (annotated {tuple(size)}, file {actual})")
    total = len(stated_size)
    if missing:
        report.problem(f"{len(missing)} of {total} image files missing", missing)
    if unreadable:
        report.problem(f"{len(unreadable)} image files unreadable or truncated", unreadable)
    if wrong_size:
        report.problem(f"{len(wrong_size)} images differ from the annotated (H, W)", wrong_size)
    if not (missing or unreadable or wrong_size):
        report.ok(f"{total} image files present and of the annotated size")
    return set(missing) | set(unreadable)


def _polygons_outside(target, height: int, width: int) -> list[str]:
    """Labels of ``target``'s polygon annotations with a point more than one pixel outside the image.

    pycocotools crops such polygons silently, so the mask decodes but is not what was annotated.
    """
    outside = []
    for label, segmentation in getattr(target, "parts", ()):
        if not isinstance(segmentation, (list, tuple)) or not all(isinstance(part, (list, tuple)) for part in segmentation):
            continue  # an RLE: its size is checked when decoding
        for polygon in segmentation:
            coords = np.asarray(polygon, dtype=np.float64)  # decodable, hence numeric and of even length
            xs, ys = coords[0::2], coords[1::2]
            if (xs < -1).any() or (ys < -1).any() or (xs > width + 1).any() or (ys > height + 1).any():
                outside.append(label)
                break
    return outside


def check_masks(dataset: ReferringDataset, unavailable_images: set[Path], report: Report) -> None:
    """Decode every GT mask and check its polygons' bounds (masks whose size must come from an absent image are skipped)."""
    undecodable, empty, box_only, decoded = [], [], 0, 0
    outside: dict[str, None] = {}  # annotation labels, once each (refs share annotations)
    for sample in tqdm(dataset, desc=f"masks {dataset.split}", file=sys.stderr, disable=None, leave=False):
        if not sample.has_mask:
            box_only += 1
            continue
        if sample.size_hint is None and sample.image_path in unavailable_images:
            continue
        try:
            mask = sample.mask()
        except (DatasetError, ImageError) as exc:
            undecodable.append(f"{sample.sample_id} ({exc})")
            continue
        decoded += 1
        outside.update(dict.fromkeys(_polygons_outside(sample.target, *mask.shape)))
        if not sample.no_target and not mask.any():
            empty.append(sample.sample_id)
    if undecodable:
        report.problem(f"{len(undecodable)} segmentations cannot be decoded", undecodable)
    else:
        report.ok(f"{decoded} masks decode" + (f"; {box_only} samples have boxes only" if box_only else ""))
    if outside:
        report.problem(f"{len(outside)} polygon annotations reach outside their image (cropped when decoded)", list(outside))
    if empty:
        report.note(f"{len(empty)} samples with a target have an empty mask", empty)


def run_ovss(cfg: DictConfig) -> int:
    """The OVSS datasets (``ovss_dataset=...``): every image and label map of ``ovss_dataset.split``."""
    dataset_cfg = cfg.ovss_dataset
    print(f"ovss dataset {dataset_cfg.name} in {dataset_cfg.root}")
    report = Report(int(cfg.examples))
    try:
        check_ovss_dataset(dataset_cfg, report)
    except DatasetError as exc:
        report.problem(str(exc))
    print("result: OK" if not report.problems else f"result: {report.problems} problem(s) found")
    return EXIT_OK if not report.problems else EXIT_PROBLEMS


def run(cfg: DictConfig) -> int:
    if cfg.get("ovss_dataset") is not None:
        return run_ovss(cfg)
    dataset_cfg = cfg.dataset
    print(f"dataset {dataset_cfg.name} (format {dataset_cfg.format}) in {dataset_cfg.root}")
    try:
        splits = read_splits(dataset_cfg)
    except DatasetError as exc:
        print(f"  PROBLEM: {exc}")
        return EXIT_PROBLEMS
    for name, dataset in splits.items():
        print(f"  split {name}: {len(dataset)} referents, {dataset.num_sentences()} sentences, {len(dataset.image_ids())} images")
    chosen = list(splits) if cfg.all_splits else [chosen_split(dataset_cfg)]
    unknown = [split for split in chosen if split not in splits]
    if unknown:
        raise ConfigError(f"dataset.split={unknown[0]} is not in the files; available splits: {', '.join(splits)}")
    report = Report(int(cfg.examples))
    for name in chosen:
        print(f"checking split {name}")
        missing = check_images(splits[name], report)
        check_masks(splits[name], missing, report)
    print("result: OK" if not report.problems else f"result: {report.problems} problem(s) found")
    return EXIT_OK if not report.problems else EXIT_PROBLEMS


def main(argv: list[str]) -> int:
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        return EXIT_OK
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None, job_name="check_data"):
            cfg = compose(config_name="check_data", overrides=argv)
        return run(cfg)
    except (HydraException, OmegaConfBaseException, ConfigError) as exc:
        message = " ".join(str(exc).split()).split(" Config search path")[0]
        print(f"check_data: usage error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except SSPSAMError as exc:
        print(f"check_data: {exc}", file=sys.stderr)
        return EXIT_PROBLEMS


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
