"""RefCOCO, RefCOCO+, RefCOCOg and ReferIt (refclef), read from the REFER files as distributed.

Layout (formats.md)::

    <folder>/refs(<split_by>).p     pickle: list of refs {ref_id, ann_id, image_id, category_id, split,
                                     file_name, sent_ids, sentences: [{raw, sent, sent_id, tokens}]}
    <folder>/instances.json         COCO style: images, annotations (bbox xywh, segmentation), categories
    <image_root>/<images[image_id].file_name>

The pickle is read with an unpickler that can only build plain containers, strings and numbers:
REFER's pickles are exactly that, and anything else (a class, a function) is refused rather than
executed. The expression of a sentence is its "sent" (REFER's cleaned, lower-cased text), or "raw"
when "sent" is empty.

The ref -> sample conversion lives here too and is shared with the gRefCOCO reader, whose refs
differ only in having lists of annotation ids.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DatasetError
from .masks import CocoSegmentationMask
from .records import ProblemLog, ReferringDataset, ReferringSample, select_splits, xywh_to_xyxy

REF_KEYS = frozenset({"ref_id", "ann_id", "image_id", "category_id", "split", "file_name", "sent_ids", "sentences"})
SENTENCE_KEYS = frozenset({"raw", "sent", "sent_id", "tokens"})

# (ref, problems, label) -> (target annotation ids, category ids), or None if the ref is malformed.
TargetReader = Callable[[dict, ProblemLog, str], "tuple[tuple[int, ...], tuple[int, ...]] | None"]


class _PlainDataUnpickler(pickle.Unpickler):
    """Builds lists, dicts, tuples, sets, strings and numbers only; any other global is refused."""

    _allowed = frozenset(
        (module, name) for module in ("builtins", "__builtin__") for name in ("set", "frozenset")
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._allowed:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (refs pickles hold plain data only)")


def load_plain_pickle(path: Path) -> Any:
    """Load a pickle of plain data (REFER's refs files, written by Python 2 or 3).

    Raises:
        DatasetError: the file is missing, corrupt, or references anything but builtin containers.
    """
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        with open(path, "rb") as file:
            return _PlainDataUnpickler(file, encoding="utf-8").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not a plain-data pickle ({exc})") from exc


def load_json(path: Path) -> Any:
    """json.load with errors that name the file."""
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from exc


@dataclass(frozen=True)
class CocoInstances:
    """instances.json indexed by id: images[image_id] and annotations[ann_id] are the raw dicts."""

    path: Path
    images: dict[Any, dict]
    annotations: dict[Any, dict]


def load_instances(path: Path) -> CocoInstances:
    """Read a COCO-style instances.json (images and annotations lists of dicts with an "id")."""
    data = load_json(path)
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object with 'images' and 'annotations'")
    indexed = {}
    for key in ("images", "annotations"):
        entries = data.get(key)
        if not isinstance(entries, list):
            raise DatasetError(f"{path}: missing or malformed '{key}' list")
        if not all(isinstance(entry, dict) and "id" in entry for entry in entries):
            raise DatasetError(f"{path}: every entry of '{key}' must be an object with an 'id'")
        indexed[key] = {entry["id"]: entry for entry in entries}
    return CocoInstances(path, indexed["images"], indexed["annotations"])


def _read_sentences(ref: dict, problems: ProblemLog, label: str):
    """-> (expressions, sentence ids, per-sentence unknown keys), or None if malformed."""
    sentences = ref.get("sentences")
    if not isinstance(sentences, list) or not sentences:
        problems.add(f"{label}: empty sentence list")
        return None
    declared_ids = ref.get("sent_ids")
    expressions, sentence_ids, sentence_meta = [], [], []
    for index, sentence in enumerate(sentences):
        if not isinstance(sentence, dict):
            problems.add(f"{label}: sentence {index} is not an object")
            return None
        text = sentence.get("sent") or sentence.get("raw")
        if not isinstance(text, str) or not text.strip():
            problems.add(f"{label}: sentence {index} is empty")
            return None
        fallback_id = declared_ids[index] if isinstance(declared_ids, list) and index < len(declared_ids) else index
        expressions.append(text.strip())
        sentence_ids.append(sentence.get("sent_id", fallback_id))
        sentence_meta.append({key: value for key, value in sentence.items() if key not in SENTENCE_KEYS})
    return tuple(expressions), tuple(sentence_ids), tuple(sentence_meta)


def _sample_from_ref(
    ref: dict,
    instances: CocoInstances,
    *,
    name: str,
    image_root: Path,
    ref_keys: frozenset[str],
    read_targets: TargetReader,
    problems: ProblemLog,
    skip_crowd: bool,
    crowd_in_boxes: bool,
) -> ReferringSample | None:
    ref_id = ref.get("ref_id")
    label = f"ref {ref_id}"
    image_id = ref.get("image_id")
    image = instances.images.get(image_id)
    if image is None:
        problems.add(f"{label}: image_id {image_id} not in {instances.path.name}")
        return None
    if not isinstance(image.get("file_name"), str):
        problems.add(f"{instances.path.name} image {image_id}: no file_name")
        return None
    sentences = _read_sentences(ref, problems, label)
    targets = read_targets(ref, problems, label)
    if sentences is None or targets is None:
        return None
    ann_ids, category_ids = targets
    target_ids, crowd_ids, boxes, parts = [], [], [], []
    for ann_id in ann_ids:
        ann_label = f"{instances.path.name} annotation {ann_id}"
        ann = instances.annotations.get(ann_id)
        if ann is None:
            problems.add(f"{label}: ann_id {ann_id} not in {instances.path.name}")
            return None
        if ann.get("image_id") != image_id:
            problems.add(f"{label}: {ann_label} belongs to image {ann.get('image_id')}, not {image_id}")
            return None
        if "segmentation" not in ann:
            problems.add(f"{label}: {ann_label} has no segmentation")
            return None
        try:
            box = xywh_to_xyxy(ann.get("bbox"), ann_label)
        except DatasetError as exc:
            problems.add(str(exc))
            return None
        if skip_crowd and ann.get("iscrowd"):
            crowd_ids.append(ann_id)
            if crowd_in_boxes:
                boxes.append(box)
            continue
        target_ids.append(ann_id)
        boxes.append(box)
        parts.append((ann_label, ann["segmentation"]))
    if ann_ids and not target_ids:
        problems.add(f"{label}: every annotation ({', '.join(map(str, ann_ids))}) is a crowd annotation, so it has no target "
                     "(G_REFER and ReLA cannot read such a ref either)")
        return None
    height, width = image.get("height"), image.get("width")
    size_hint = (height, width) if isinstance(height, int) and isinstance(width, int) else None
    expressions, sentence_ids, sentence_meta = sentences
    extras = {key: value for key, value in ref.items() if key not in ref_keys}
    if skip_crowd:
        extras["crowd_ann_ids"] = tuple(crowd_ids)
    return ReferringSample(
        sample_id=str(ref_id),
        image_id=image_id,
        image_path=image_root / image["file_name"],
        expressions=expressions,
        sentence_ids=sentence_ids,
        ann_ids=tuple(target_ids),
        boxes_xyxy=tuple(boxes),
        no_target=not target_ids,
        target=CocoSegmentationMask(tuple(parts)),
        size_hint=size_hint,
        meta={**extras, "dataset": name, "ref_id": ref_id, "category_ids": category_ids, "sentence_meta": sentence_meta},
    )


def build_splits(
    refs: Any,
    instances: CocoInstances,
    *,
    source: Path,
    name: str,
    task: str,
    image_root: Path,
    ref_keys: frozenset[str],
    read_targets: TargetReader,
    splits: Sequence[str] | None,
    skip_crowd: bool = False,
    crowd_in_boxes: bool = False,
) -> dict[str, ReferringDataset]:
    """Group refs by their "split" and turn each into a sample; malformed refs are reported together.

    Args:
        refs: the list loaded from the refs file ``source``.
        ref_keys: keys with a known meaning; every other ref key is passed to ``meta``.
        read_targets: extracts (annotation ids, category ids) from a ref.
        splits: splits to build (None: all found).
        skip_crowd: leave annotations with a true "iscrowd" out of the target (ann_ids, mask),
            as G_REFER / ReLA do for gRefCOCO; their ids go to ``meta["crowd_ann_ids"]``. A ref
            whose annotations are all crowd is malformed (no reference reads it). Without it, a
            ref's annotation is its target whatever its "iscrowd" (REFER, RefCOCO family).
        crowd_in_boxes: with skip_crowd, the skipped annotations' boxes still go to
            ``boxes_xyxy`` (the release's gRefCOCO box target covers every annotation of the ref).

    Raises:
        DatasetError: unknown split, or malformed refs (all listed in one message).
    """
    if not isinstance(refs, list):
        raise DatasetError(f"{source}: expected a list of refs, got {type(refs).__name__}")
    problems = ProblemLog(str(source))
    refs_by_split: dict[str, list[dict]] = {}
    for index, ref in enumerate(refs):
        if not isinstance(ref, dict) or not isinstance(ref.get("split"), str):
            problems.add(f"entry {index}: not a ref with a 'split'")
            continue
        refs_by_split.setdefault(ref["split"], []).append(ref)
    labels = list(refs_by_split)
    # Requested splits are read as REFER's getRefIds reads them (a test split also takes the refs of the
    # composite labels that contain it); all splits (None) are the labels found, each once.
    members = {label: [label] for label in labels}
    if splits is not None:
        members = {split: found for split in {*labels, *splits} if (found := refer_split_labels(split, labels))}
    datasets = {}
    for split in select_splits(splits, list(members), str(source)):
        samples = [
            _sample_from_ref(
                ref, instances, name=name, image_root=image_root, ref_keys=ref_keys, read_targets=read_targets,
                problems=problems, skip_crowd=skip_crowd, crowd_in_boxes=crowd_in_boxes,
            )
            for label in members[split]
            for ref in refs_by_split[label]
        ]
        datasets[split] = ReferringDataset(name, split, task, [sample for sample in samples if sample is not None])
    problems.raise_if_any()
    return datasets


def refer_split_labels(split: str, labels: Sequence[str]) -> list[str]:
    """The refs files' split labels that make up ``split``, as REFER's ``getRefIds`` selects them:
    "testA" / "testB" / "testC" take every test label containing that letter ("we also consider testAB,
    testBC, ..."), "test" every test label, any other split its own label. Labels in file order."""
    if split in ("testA", "testB", "testC"):
        return [label for label in labels if label.startswith("test") and split[-1] in label[len("test"):]]
    if split == "test":
        return [label for label in labels if label.startswith("test")]
    return [split] if split in labels else []


def _single_target(ref: dict, problems: ProblemLog, label: str):
    ann_id, category_id = ref.get("ann_id"), ref.get("category_id")
    if not isinstance(ann_id, int):
        problems.add(f"{label}: ann_id must be one integer, got {ann_id!r}")
        return None
    return (ann_id,), (category_id,)


def refs_file(folder: Path, prefix: str, split_by: str, suffix: str) -> Path:
    """``<folder>/<prefix>(<split_by>)<suffix>``; if missing, the error lists the split_by values present."""
    path = folder / f"{prefix}({split_by}){suffix}"
    if not path.is_file():
        present = sorted(p.name for p in folder.glob(f"{prefix}(*){suffix}")) if folder.is_dir() else []
        hint = f"; found: {', '.join(present)}" if present else ""
        raise DatasetError(f"{path}: file not found{hint}")
    return path


def read_refer(
    folder: Path, *, split_by: str, image_root: Path, name: str, task: str = "res", splits: Sequence[str] | None = None
) -> dict[str, ReferringDataset]:
    """Read ``refs(<split_by>).p`` + ``instances.json`` of ``folder`` -> {split: dataset}.

    Args:
        folder: e.g. ``<root>/refcocog``; split_by chooses the refs file ("unc", "umd", "google", "berkeley").
        image_root: folder the images' file_name is relative to.
        splits: splits to build; None builds every split in the file.
    """
    folder, image_root = Path(folder), Path(image_root)
    refs_path = refs_file(folder, "refs", split_by, ".p")
    instances = load_instances(folder / "instances.json")
    return build_splits(
        load_plain_pickle(refs_path),
        instances,
        source=refs_path,
        name=name,
        task=task,
        image_root=image_root,
        ref_keys=REF_KEYS,
        read_targets=_single_target,
        splits=splits,
    )
