"""From a dataset config (``configs/dataset/*.yaml``) to a :class:`ReferringDataset`.

A dataset config is a mapping with these keys:

- ``name``: the dataset's name, used in messages, metrics and merged sample ids ("refcoco", ...).
- ``format``: which reader: "refer" (RefCOCO/+/g, refclef, ShapeWorld RES), "grefcoco" (gRefCOCO,
  ShapeWorld GRES), "phrasecut", "jsonl", "rec_json" (SimREC's merge.json, the release's REC
  pretraining data) or "merged".
- ``root`` and ``folder``: the annotation files live in ``<root>/<folder>/``.
- ``image_root``: folder the images' file names are relative to (not used by jsonl).
- ``split``: the split to load, as named in the files ("val", "testA", ...).
- ``split_by``: which refs file, ``refs(<split_by>).p`` / ``grefs(<split_by>).json`` (refer, grefcoco).
- ``task``: "res", "gres" or "phrasecut" (how the dataset is evaluated).
- grefcoco only, optional ``crowd_in_boxes`` (default true, the release): crowd annotations are
  never part of the target mask, but their boxes count in the GT box (see ``grefcoco.py``).
- jsonl only, optional ``path``: one JSONL file to read instead of ``<root>/<folder>/<split>.jsonl``.
- rec_json only: ``file`` (default "merge.json", in ``<root>/<folder>/``), ``image_roots``
  ({data_source: image folder}) and ``box_format`` ("xywh", SimREC's, or "xyxy"); see ``rec_json.py``.
- optional, any format: ``sentence_samples`` (default null: one sample per referent), a mapping
  {split, max_words, pool}: that split (the training split) gets one sample per sentence of at
  most ``max_words`` words (null: no limit), drawing from its referent's sentences (pool
  "referent") or only its own ("own"), as the release's REC pretraining set; see
  ``sentence_samples.py``. Other splits keep one sample per referent, so evaluation still scores
  every sentence once.
- merged only: ``sources`` (a list of dataset configs; missing ``root`` / ``task`` are taken from
  the merged config, missing ``split`` is "train") and ``exclude_eval_images`` (default true). Its
  only split is "train".

The merged set is the union of the sources' training splits (the REC pretraining set). Sample
ids become ``"<source name>/<sample id>"``. With ``exclude_eval_images``, a training sample whose
image file appears in any other split of any source is dropped: RefCOCO, RefCOCO+ and RefCOCOg
share COCO images, and RefCOCOg's training images include RefCOCO's val/test images, so without
this the pretraining set would contain the evaluation images.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from omegaconf.errors import OmegaConfBaseException

from ..errors import ConfigError, first_line
from .grefcoco import read_grefcoco
from .jsonl import read_jsonl, read_jsonl_file
from .phrasecut import read_phrasecut
from .rec_json import read_rec_json
from .records import TASKS, ReferringDataset, select_splits
from .refer import read_refer
from .sentence_samples import one_sample_per_sentence

Splits = Sequence[str] | None
MERGED_SPLIT = "train"  # the merged set exists for pretraining only


def _get(cfg: Mapping, key: str, default: Any = None, *, required: bool = True) -> Any:
    """cfg[key] with a ConfigError naming the key when it is missing, null or fails to resolve."""
    try:
        value = cfg[key] if key in cfg else None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"dataset config: key '{key}' cannot be resolved ({first_line(exc)})") from None
    if value is None:
        if required:
            raise ConfigError(f"{_describe(cfg)}: missing key '{key}'")
        return default
    return value


def _describe(cfg: Mapping) -> str:
    name = cfg.get("name")
    return f"dataset config {name!r}" if isinstance(name, str) else "dataset config"


def _folder(cfg: Mapping) -> Path:
    return Path(_get(cfg, "root")) / str(_get(cfg, "folder"))


def _read_refer(cfg: Mapping, name: str, task: str, splits: Splits) -> dict[str, ReferringDataset]:
    return read_refer(
        _folder(cfg), split_by=_get(cfg, "split_by"), image_root=Path(_get(cfg, "image_root")), name=name, task=task, splits=splits
    )


def _read_grefcoco(cfg: Mapping, name: str, task: str, splits: Splits) -> dict[str, ReferringDataset]:
    return read_grefcoco(
        _folder(cfg),
        split_by=_get(cfg, "split_by"),
        image_root=Path(_get(cfg, "image_root")),
        name=name,
        task=task,
        splits=splits,
        crowd_in_boxes=bool(_get(cfg, "crowd_in_boxes", default=True, required=False)),
    )


def _read_phrasecut(cfg: Mapping, name: str, task: str, splits: Splits) -> dict[str, ReferringDataset]:
    return read_phrasecut(_folder(cfg), image_root=Path(_get(cfg, "image_root")), name=name, task=task, splits=splits)


def _read_jsonl(cfg: Mapping, name: str, task: str, splits: Splits) -> dict[str, ReferringDataset]:
    path = _get(cfg, "path", required=False)
    if path is None:
        return read_jsonl(_folder(cfg), name=name, task=task, splits=splits)
    split = _get(cfg, "split", default=Path(path).stem, required=False)
    select_splits(splits, [split], str(path))
    return {split: read_jsonl_file(Path(path), name=name, split=split, task=task)}


def _read_rec_json(cfg: Mapping, name: str, task: str, splits: Splits) -> dict[str, ReferringDataset]:
    image_roots = _get(cfg, "image_roots")
    if not isinstance(image_roots, Mapping) or not image_roots:
        raise ConfigError(f"{_describe(cfg)}: 'image_roots' must map each data_source to its image folder")
    return read_rec_json(
        _folder(cfg) / str(_get(cfg, "file", default="merge.json", required=False)),
        image_roots={str(source): Path(str(folder)) for source, folder in image_roots.items()},
        name=name,
        box_format=str(_get(cfg, "box_format", default="xywh", required=False)),
        task=task,
        splits=splits,
    )


def _read_merged(cfg: Mapping, name: str, task: str, splits: Splits) -> dict[str, ReferringDataset]:
    select_splits(splits, [MERGED_SPLIT], f"dataset {name}")
    sources = _get(cfg, "sources")
    if isinstance(sources, (str, Mapping)) or not isinstance(sources, Sequence) or not sources:
        raise ConfigError(f"dataset config {name!r}: 'sources' must be a non-empty list of dataset configs")
    exclude_eval_images = bool(_get(cfg, "exclude_eval_images", default=True, required=False))
    inherited = {"root": _get(cfg, "root", required=False), "task": task, "split": "train"}
    training_sets, eval_images = [], set()
    for source in sources:
        if not isinstance(source, Mapping):
            raise ConfigError(f"dataset config {name!r}: every entry of 'sources' must be a dataset config")
        try:
            source_cfg = {**inherited, **{key: source[key] for key in source}}
        except OmegaConfBaseException as exc:
            raise ConfigError(f"dataset config {name!r}: a source cannot be resolved ({first_line(exc)})") from None
        source_split = _get(source_cfg, "split")
        if exclude_eval_images:
            source_splits = read_splits(source_cfg)
            select_splits([source_split], list(source_splits), f"dataset {_get(source_cfg, 'name')}")
            eval_images.update(
                path for other, dataset in source_splits.items() if other != source_split for path in dataset.image_paths()
            )
            training_sets.append(source_splits[source_split])
        else:
            training_sets.append(load_dataset(source_cfg))
    source_names = [dataset.name for dataset in training_sets]
    if len(set(source_names)) != len(source_names):
        raise ConfigError(f"dataset config {name!r}: source names must be distinct, got {source_names}")
    samples = [
        replace(sample, sample_id=f"{dataset.name}/{sample.sample_id}")
        for dataset in training_sets
        for sample in dataset
        if sample.image_path not in eval_images
    ]
    return {MERGED_SPLIT: ReferringDataset(name, MERGED_SPLIT, task, samples)}


READERS: dict[str, Callable[[Mapping, str, str, Splits], dict[str, ReferringDataset]]] = {
    "refer": _read_refer,
    "grefcoco": _read_grefcoco,
    "phrasecut": _read_phrasecut,
    "jsonl": _read_jsonl,
    "rec_json": _read_rec_json,
    "merged": _read_merged,
}
SENTENCE_SAMPLE_KEYS = frozenset({"split", "max_words", "pool"})


def _read(cfg: Mapping, splits: Splits) -> dict[str, ReferringDataset]:
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"dataset config must be a mapping, got {type(cfg).__name__}")
    data_format = _get(cfg, "format")
    reader = READERS.get(data_format)
    if reader is None:
        raise ConfigError(f"{_describe(cfg)}: unknown format {data_format!r} (key 'format'); expected one of {', '.join(READERS)}")
    task = _get(cfg, "task")
    if task not in TASKS:
        raise ConfigError(f"{_describe(cfg)}: unknown task {task!r} (key 'task'); expected one of {', '.join(TASKS)}")
    datasets = reader(cfg, str(_get(cfg, "name")), task, splits)
    per_sentence = _get(cfg, "sentence_samples", required=False)
    if per_sentence is None:
        return datasets
    if not isinstance(per_sentence, Mapping) or not set(per_sentence) <= SENTENCE_SAMPLE_KEYS or "split" not in per_sentence:
        raise ConfigError(f"{_describe(cfg)}: 'sentence_samples' must be null or a mapping with 'split' and optional 'max_words', 'pool'")
    split = per_sentence["split"]
    if split in datasets:
        datasets[split] = one_sample_per_sentence(
            datasets[split], max_words=per_sentence.get("max_words"), pool=per_sentence.get("pool", "referent")
        )
    return datasets


def read_splits(cfg: Mapping) -> dict[str, ReferringDataset]:
    """Every split the dataset's files hold -> {split: dataset} (``cfg["split"]`` is not used)."""
    return _read(cfg, None)


def load_splits(cfg: Mapping, splits: Sequence[str]) -> dict[str, ReferringDataset]:
    """Several named splits of one dataset, reading its files once (``cfg["split"]`` is not used)."""
    return _read(cfg, list(dict.fromkeys(splits)))


def load_dataset(cfg: Mapping) -> ReferringDataset:
    """The split ``cfg["split"]`` of the dataset described by ``cfg`` (see the module docstring).

    Raises:
        ConfigError: a missing key, an unknown format or task.
        DatasetError: missing or malformed files, or a split not in the files (the message lists
            the splits found).
    """
    split = chosen_split(cfg)
    return _read(cfg, [split])[split]


def chosen_split(cfg: Mapping) -> str:
    """``cfg["split"]``; for JSON Lines, when null, the file's name (path=.../test.jsonl: "test"), or "val"
    for a folder, so that a file given by path is never labelled by a default split name."""
    split = _get(cfg, "split", required=False)
    if split is None and cfg.get("format") == "jsonl":
        split = Path(str(cfg["path"])).stem if cfg.get("path") is not None else "val"
    return str(split) if split is not None else _get(cfg, "split")  # a ConfigError naming the key
