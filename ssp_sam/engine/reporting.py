"""Evaluation results as files, and results files as the paper's table.

:func:`write_results` writes one JSON file per evaluation with everything metrics.md "Reporting"
asks for (every applicable metric, the protocol, dataset, split, model, checkpoint hash, image
count, the exact command) and what identifies the evaluated data (referents, sentences, images, a
fingerprint of the sentences, the data's paths and ``split_by``) and settings (precision, the model's
effective config, the sha256 of its CLIP and SAM weight files), so that tables can be regenerated from
files alone. The checkpoint's identity is taken when it is loaded (:class:`CheckpointWatch`), so that it is
the identity of the weights evaluated even when a training replaces the checkpoint meanwhile.

:func:`make_tables` lays any number of such files of one protocol out as the SSP-SAM paper does: one
row per run; columns RefCOCO val/testA/testB, RefCOCO+ val/testA/testB, RefCOCOg val(U)/test(U),
ReferIt test, gRefCOCO val/testA/testB (gIoU, cIoU, N-acc each) and PhraseCut test, then any other
dataset (e.g. ShapeWorld) with its splits. Results of different protocols are never put in one table;
one column never holds results on different data, one row never results of different weights or
settings (a field a file lacks, written before it was recorded, is unknown and not compared).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import __version__
from ..checkpoint import CONFIG_FILE, WEIGHTS_FILE, flat_settings
from ..errors import CheckpointError, ConfigError
from ..fileio import atomic_path, file_sha256, write_json
from ..metrics import (
    GRES_KEYS,
    PRECISION_THRESHOLDS,
    RELEASE_GRES_KEYS,
    RELEASE_RES_KEYS,
    RELEASE_SUFFIX,
    RES_KEYS,
    format_rows,
)
from ..weight_identity import remembered_sha256, weight_file_record
from .evaluator import EvaluationResult
from .protocols import PROTOCOLS

GRES_TABLE_METRICS = ("gIoU", "cIoU", "N-acc")
MISSING = "-"

# The paper's column groups: (title, dataset names that fill it, (split, split title) pairs).
# A run must not have results of two names of one group for the same split.
PAPER_LAYOUT: tuple[tuple[str, tuple[str, ...], tuple[tuple[str, str], ...]], ...] = (
    ("RefCOCO", ("refcoco",), (("val", "val"), ("testA", "testA"), ("testB", "testB"))),
    ("RefCOCO+", ("refcoco+",), (("val", "val"), ("testA", "testA"), ("testB", "testB"))),
    ("RefCOCOg", ("refcocog_umd",), (("val", "val(U)"), ("test", "test(U)"))),
    ("ReferIt", ("refclef_unc", "refclef_berkeley"), (("test", "test"),)),
    ("gRefCOCO", ("grefcoco",), (("val", "val"), ("testA", "testA"), ("testB", "testB"))),
    ("PhraseCut", ("phrasecut",), (("test", "test"),)),
)
# Split order of the datasets appended after the paper's; unknown splits follow alphabetically.
SPLIT_ORDER = ("train", "val", "testA", "testB", "testC", "test")
REQUIRED_KEYS = {"metrics": Mapping, "dataset": str, "split": str, "protocol": str}
OVSS_PROTOCOLS = ("sliding_window", "whole_image")  # what an OVSS results JSON names as its protocol
# Keys of a dataset config that say where its data is (recorded with the results, for the reader).
DATA_CONFIG_KEYS = ("format", "root", "folder", "image_root", "split_by", "path", "task")
# Model settings that name weight files: their contents are compared (weight_files), not their paths.
_WEIGHT_FILE_SETTINGS = ("clip_checkpoint", "sam_checkpoint")


def command_line() -> str:
    """The exact command of this process, interpreter included, quoted for a POSIX shell."""
    return " ".join(shlex.quote(arg) for arg in (sys.executable, *sys.argv))


def checkpoint_weights(path: str | os.PathLike) -> Path:
    """The file holding a checkpoint's weights: ``model.safetensors`` of one of our directories, else the file itself."""
    path = Path(path)
    return path / WEIGHTS_FILE if path.is_dir() else path


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a checkpoint's weights (:func:`checkpoint_weights`), remembered per file identity
    (``ssp_sam.weight_identity.remembered_sha256``: a release file is hashed once, a replaced one again)."""
    weights = checkpoint_weights(path)

    def hash_file(name: str) -> str:
        try:
            return file_sha256(name)
        except OSError as error:
            raise CheckpointError(f"{weights}: cannot read the checkpoint to hash it ({error.strerror or error})") from None

    return remembered_sha256(weights, hash_file=hash_file)


@dataclass(frozen=True)
class CheckpointIdentity:
    """What a results file records of the weights evaluated: the checkpoint's path and sha256, and
    ``{config key: {"path", "sha256"}}`` of the weight files its frozen encoders came from."""

    path: str
    sha256: str
    weight_files: dict[str, dict[str, str]] = field(default_factory=dict)


def _file_state(path: Path, content: bool = True) -> tuple[int, ...] | None:
    """What changes when a file is replaced (device, inode) or written in place (size, mtime, ctime); None if absent."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino, *((stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns) if content else ()))


class CheckpointWatch:
    """The identity of the checkpoint a model is loaded from, taken around the load.

    Create it just before the checkpoint is first read; call :meth:`identity` once the model is loaded. The
    checkpoint's files (its weights; of one of our directories also the directory, which a training's save
    replaces as a whole, and its config.json) are looked at before and after: if any was replaced or
    written meanwhile (a training saving ``last/`` while it is evaluated), the weights loaded may be those
    of another epoch than the ones hashed, and :meth:`identity` refuses to name them. The hash is taken
    after the load, of the file the load read.
    """

    def __init__(self, checkpoint: str | os.PathLike) -> None:
        self.checkpoint = Path(checkpoint)
        self._before = self._states()

    def _states(self) -> dict[str, tuple[int, ...] | None]:
        states = {str(checkpoint_weights(self.checkpoint)): _file_state(checkpoint_weights(self.checkpoint))}
        if self.checkpoint.is_dir():
            states[str(self.checkpoint)] = _file_state(self.checkpoint, content=False)
            states[str(self.checkpoint / CONFIG_FILE)] = _file_state(self.checkpoint / CONFIG_FILE)
        elif self.checkpoint.suffix == ".safetensors":  # our weights file named alone: its config.json beside it
            states[str(self.checkpoint.parent / CONFIG_FILE)] = _file_state(self.checkpoint.parent / CONFIG_FILE)
        return states

    def identity(self, weight_files: Mapping[str, str | None] | None = None) -> CheckpointIdentity:
        """The loaded checkpoint's :class:`CheckpointIdentity`; ``weight_files``: ``{config key: path}`` of the
        weight files the loaded model's encoders came from (None: not a file).

        Raises:
            CheckpointError: the checkpoint changed between the watch's start and now (named).
        """
        digest = checkpoint_sha256(self.checkpoint)
        files = weight_file_record(weight_files or {})
        after = self._states()
        changed = [name for name, state in after.items() if self._before.get(name) != state]
        if changed:
            raise CheckpointError(
                f"{self.checkpoint}: changed while it was being loaded ({changed[0]} was replaced or written, e.g. by a "
                "training saving it), so the weights loaded are not known; evaluate again, or evaluate a copy"
            )
        return CheckpointIdentity(str(self.checkpoint), digest, files)


def check_distinct_outputs(outputs: Mapping[str, str | os.PathLike | None]) -> None:
    """Two outputs of one command must be two files: one written over the other would be lost.

    Args:
        outputs: ``{option: path}`` (None: not asked for), e.g. ``{"metrics_out": ..., "samples_out": ...}``.

    Raises:
        ConfigError: naming the two options that name one file (also through a symbolic or hard link).
    """
    seen: list[tuple[str, Path]] = []
    for key, path in outputs.items():
        if path is None:
            continue
        path = Path(path)
        for other_key, other in seen:
            same = os.path.realpath(path) == os.path.realpath(other)
            if not same and path.exists() and other.exists():
                same = os.path.samefile(path, other)
            if same:
                raise ConfigError(f"{key}={path}: the same file as {other_key}={other}; give each output its own file")
        seen.append((key, path))


def write_results(
    path: str | os.PathLike,
    result: EvaluationResult,
    dataset_cfg: Mapping[str, Any],
    model_name: str,
    checkpoint_path: str | os.PathLike,
    command: str,
    label: str | None = None,
    identity: CheckpointIdentity | None = None,
    cache_dtype: str | None = None,
) -> dict[str, Any]:
    """Write the results JSON of one evaluation atomically; returns what was written.

    Keys: metrics, by_group (and group_key, the sentence key it is by), dataset and split (from
    ``dataset_cfg``), task, protocol, precision, model, label (the run's row in tables; the model name by
    default), checkpoint, checkpoint_sha256, weight_files ({config key: {path, sha256}} of the CLIP and SAM
    weight files), model_config (the model's effective config, overrides included), data (the dataset
    config's paths and ``split_by``, n_referents and sha256, ``evaluator.data_sha256``), n_images, n_samples
    (sentences), cache_dtype (of the SAM embeddings read from a cache; null: computed), command, created
    (UTC, ISO 8601), ssp_sam_version.

    ``identity``: the checkpoint's, taken when it was loaded (:class:`CheckpointWatch`); None: taken now
    (a caller whose model's weights cannot have been replaced since, e.g. the trainer's test).
    """
    if identity is None:
        files = {f"model.{key}": (result.model_config or {}).get(key) for key in _WEIGHT_FILE_SETTINGS}
        identity = CheckpointIdentity(str(checkpoint_path), checkpoint_sha256(checkpoint_path), weight_file_record(files))
    data = {key: str(dataset_cfg[key]) for key in DATA_CONFIG_KEYS if dataset_cfg.get(key) is not None}
    record = {
        "metrics": dict(result.metrics),
        "by_group": {group: dict(values) for group, values in result.by_group.items()},
        "group_key": result.group_key,
        "dataset": str(dataset_cfg["name"]),
        "split": str(dataset_cfg["split"]),
        "task": result.task,
        "protocol": result.protocol,
        "precision": result.precision,
        "model": model_name,
        "label": str(label) if label is not None else model_name,
        "checkpoint": str(checkpoint_path),
        "checkpoint_sha256": identity.sha256,
        "weight_files": identity.weight_files,
        "model_config": result.model_config,
        "data": {**data, "n_referents": result.n_referents, "sha256": result.data_sha256},
        "n_images": result.n_images,
        "n_samples": result.n_samples,
        "cache_dtype": cache_dtype,
        "command": command,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "ssp_sam_version": __version__,
    }
    write_json(path, record)
    return record


def write_samples(path: str | os.PathLike, result: EvaluationResult) -> None:
    """Write the per-sentence scores of one evaluation as JSON Lines, atomically.

    One object per sentence in dataset order (``EvaluationResult.per_sample``: sample and sentence
    ids, expression, image, group, I, U, IoU, ...), for failure analysis: which expressions fail,
    and how.
    """
    with atomic_path(path) as tmp, open(tmp, "w") as file:
        for record in result.per_sample:
            file.write(json.dumps(record, default=_json_scalar) + "\n")


def _json_scalar(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy and torch scalars
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def is_ovss_results(record: Any) -> bool:
    """Whether ``record`` is the results JSON of an OVSS evaluation (scripts/eval.py on an OVSS checkpoint)."""
    return isinstance(record, Mapping) and (
        record.get("protocol") in OVSS_PROTOCOLS or "per_class_iou" in record or "ovss_model" in record
    )


def check_results(record: Any) -> None:
    """Raise ValueError unless ``record`` looks like a results file written by :func:`write_results`."""
    if not isinstance(record, Mapping):
        raise ValueError(f"expected a JSON object of results, got {type(record).__name__}")
    if is_ovss_results(record):
        raise ValueError(
            "an OVSS evaluation's results (mIoU, fwIoU, per-class IoU): the paper's table holds referring "
            "segmentation (RES, GRES, PhraseCut) results only"
        )
    for key, kind in REQUIRED_KEYS.items():
        if not isinstance(record.get(key), kind):
            raise ValueError(f"key {key!r} missing or not a {'JSON object' if kind is Mapping else 'string'}"
                             + (" (a file written before protocols were named: evaluate again)" if key == "protocol" else ""))
    if not (record.get("label") or record.get("model")):
        raise ValueError("neither 'label' nor 'model' names the run")
    if record["protocol"] not in PROTOCOLS:
        raise ValueError(f"unknown protocol {record['protocol']!r} (known: {', '.join(PROTOCOLS)})")


# ----------------------------------------------------------------------------- console


def console_key_sets(task: str, protocol: str = "standard") -> list[tuple[str, ...]]:
    """The metrics of a task in the order the console shows them, one tuple per table row; under
    the ssp_sam_release protocol a second row holds the release's arithmetic."""
    if task == "gres":
        key_sets = [("n_samples", "n_target", "n_no_target", *GRES_KEYS)]
    else:
        key_sets = [("n_samples", *(RES_KEYS if task == "res" else tuple(key for key in RES_KEYS if key != "REC-acc")))]
    if protocol == "ssp_sam_release":  # the paper's Pr@0.5 ... Pr@0.9 of the release's nine
        shown = {f"Pr@{threshold}{RELEASE_SUFFIX}" for threshold in PRECISION_THRESHOLDS}
        keys = RELEASE_GRES_KEYS if task == "gres" else RELEASE_RES_KEYS
        key_sets.append(tuple(key for key in keys if not key.startswith("Pr@") or key in shown))
    return key_sets


def console_tables(result: EvaluationResult) -> str:
    """The metrics as text tables (under ssp_sam_release: the standard arithmetic, then the
    release's), one row for all samples and one per group (e.g. ShapeWorld's expression kinds)."""
    rows = {"all": result.metrics, **result.by_group}
    return "\n\n".join(
        format_rows(rows, keys, label_title="group") for keys in console_key_sets(result.task, result.protocol)
    )


# ----------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class _Column:
    group: str  # dataset title ("RefCOCO")
    split: str  # split as named in the results ("val")
    split_title: str  # split as printed ("val(U)")
    metric: str  # key in the results' metrics
    metric_title: str  # printed under GRES columns; "" where the table's metric is implied


def _row_label(record: Mapping[str, Any]) -> str:
    return str(record.get("label") or record.get("model"))


def _group_columns(group: str, splits: Sequence[tuple[str, str]], gres: bool, metric: str) -> list[_Column]:
    metrics = [(name, name) for name in GRES_TABLE_METRICS] if gres else [(metric, "")]
    return [_Column(group, split, split_title, key, title) for split, split_title in splits for key, title in metrics]


def _split_rank(split: str) -> tuple[int, str]:
    return (SPLIT_ORDER.index(split), "") if split in SPLIT_ORDER else (len(SPLIT_ORDER), split)


def _layout(results: Sequence[Mapping[str, Any]], metric: str) -> tuple[list[_Column], dict[str, str]]:
    """Every column, and dataset name -> the title of its column group. A paper dataset's splits the
    paper does not print (RefCOCO train, PhraseCut val, refclef_unc's testA ...) follow its paper splits,
    so that no result given is left out."""
    columns: list[_Column] = []
    group_of: dict[str, str] = {}
    for title, names, splits in PAPER_LAYOUT:
        extra = {record["split"] for record in results if record["dataset"] in names} - {split for split, _ in splits}
        splits = (*splits, *((split, split) for split in sorted(extra, key=_split_rank)))
        columns += _group_columns(title, splits, title == "gRefCOCO", metric)
        group_of.update({name: title for name in names})
    others: dict[str, tuple[bool, set[str]]] = {}
    for record in results:
        if record["dataset"] not in group_of:
            others.setdefault(record["dataset"], (record.get("task") == "gres", set()))[1].add(record["split"])
    for name, (gres, splits) in others.items():
        columns += _group_columns(name, [(split, split) for split in sorted(splits, key=_split_rank)], gres, metric)
        group_of[name] = name
    return columns, group_of


def _format_value(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return MISSING
    return f"{100.0 * value:.2f}"


def _table_protocol(results: Sequence[Mapping[str, Any]]) -> str:
    """The one protocol of all ``results`` (checked records); ValueError naming a run of each if they mix."""
    first_of: dict[str, Mapping[str, Any]] = {}
    for record in results:
        first_of.setdefault(record["protocol"], record)
    if len(first_of) > 1:
        found = ", ".join(
            f"{protocol} ({_row_label(record)} {record['dataset']} {record['split']})" for protocol, record in first_of.items()
        )
        raise ValueError(f"results of different protocols cannot share a table: {found}; make one table per protocol")
    return next(iter(first_of))


_RELEASE_KEYS = frozenset((*RELEASE_RES_KEYS, *RELEASE_GRES_KEYS))


def _shows_release_arithmetic(metric: str, protocol: str) -> bool:
    """Whether a column of ``metric`` shows the release's own number (as its paper prints it): under
    ssp_sam_release, for every metric the release computes (not REC-acc)."""
    return protocol == "ssp_sam_release" and f"{metric}{RELEASE_SUFFIX}" in _RELEASE_KEYS


def _cell_value(metrics: Mapping[str, Any], metric: str, protocol: str) -> Any:
    """A column's value: the release's own number where the column shows it (missing if a result lacks
    it: never the standard number under the release's name), else the metric itself."""
    if _shows_release_arithmetic(metric, protocol):
        return metrics.get(f"{metric}{RELEASE_SUFFIX}")
    return metrics.get(metric)


FieldPath = tuple[str, ...]  # keys into a results record, e.g. ("data", "sha256")


def _known(record: Mapping[str, Any], path: FieldPath) -> tuple[bool, Any]:
    """(whether ``record`` has the field at ``path``, its value): a results file written before a field
    was recorded does not know it, nor does a null (a count or fingerprint not taken); inside the model's
    config, null is a setting like any other."""
    node: Any = record
    for depth, part in enumerate(path):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
        if node is None and not (path[0] == "model_config" and depth > 0):
            return False, None
    return True, node


def _shown(value: Any) -> str:
    text = str(value)
    return f"{text[:12]}..." if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else text


def _first_difference(a: Mapping[str, Any], b: Mapping[str, Any], paths: Sequence[FieldPath]) -> tuple[str, Any, Any] | None:
    """The first of ``paths`` both records know and hold different values for: (its dotted name, a's, b's)."""
    for path in paths:
        (known_a, value_a), (known_b, value_b) = _known(a, path), _known(b, path)
        if known_a and known_b and value_a != value_b:
            return ".".join(path), value_a, value_b
    return None


# What one column's results must share: the same data (the split is the column's).
_DATA_FIELDS: tuple[FieldPath, ...] = (
    ("dataset",), ("data", "split_by"), ("n_images",), ("n_samples",), ("data", "n_referents"), ("data", "sha256"),
)


def _setting_fields(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[FieldPath]:
    """What one row's results must share: the checkpoint's weights, those of its weight files and every
    other model setting (paths of weight files aside: moved files are the same weights), and the precision."""
    fields: list[FieldPath] = [("checkpoint_sha256",), ("precision",)]
    files = {*(_known(a, ("weight_files",))[1] or {}), *(_known(b, ("weight_files",))[1] or {})}
    fields += [("weight_files", key, "sha256") for key in sorted(files)]
    config_a, config_b = _known(a, ("model_config",))[1] or {}, _known(b, ("model_config",))[1] or {}
    settings = {**flat_settings(config_a), **flat_settings(config_b)}
    fields += [("model_config", *key.split(".")) for key in settings if key not in _WEIGHT_FILE_SETTINGS]
    return fields


def _weight_files_differ(a: Mapping[str, Any], b: Mapping[str, Any]) -> str | None:
    """A weight file one record's model was built from and the other's was not (both records knowing theirs)."""
    files_a, files_b = _known(a, ("weight_files",)), _known(b, ("weight_files",))
    if not (files_a[0] and files_b[0]):
        return None
    for key in sorted({*files_a[1], *files_b[1]}):
        if (key in files_a[1]) != (key in files_b[1]):
            return key
    return None


def _table_cells(
    results: Sequence[Mapping[str, Any]], metric: str, sources: Sequence[str] | None = None
) -> tuple[str, list[_Column], dict[str, list[str]]]:
    """The table's protocol, its columns and, per run label (in order of first appearance), one
    formatted cell per column. ``sources`` name the results in messages (their files)."""
    for record in results:
        check_results(record)
    if sources is None:
        sources = [f"result {i + 1} ({_row_label(r)} {r['dataset']} {r['split']})" for i, r in enumerate(results)]
    protocol = _table_protocol(results)
    columns, group_of = _layout(results, metric)
    # GRES columns name their metric: under the release's arithmetic with the name that says so (metrics.md)
    columns = [
        replace(column, metric_title=f"{column.metric_title}{RELEASE_SUFFIX}")
        if column.metric_title and _shows_release_arithmetic(column.metric, protocol) else column
        for column in columns
    ]
    metrics_at: dict[str, dict[tuple[str, str], Mapping[str, Any]]] = {}
    first_of_row: dict[str, int] = {}  # label -> index of its first result
    first_of_column: dict[tuple[str, str], int] = {}  # (group, split) -> index of its first result
    for index, record in enumerate(results):
        label, cell = _row_label(record), (group_of[record["dataset"]], record["split"])
        first = results[first_of_row.setdefault(label, index)]
        if first.get("checkpoint_sha256") and record.get("checkpoint_sha256") and first["checkpoint_sha256"] != record["checkpoint_sha256"]:
            raise ValueError(
                f"run {label!r} names two checkpoints ({first.get('checkpoint')} for {first['dataset']} {first['split']} in "
                f"{sources[first_of_row[label]]}, {record.get('checkpoint')} for {record['dataset']} {record['split']} in "
                f"{sources[index]}): give each evaluation its own label="
            )
        missing_file = _weight_files_differ(first, record)
        difference = _first_difference(first, record, _setting_fields(first, record))
        if missing_file or difference:
            what = (f"{missing_file} (a weight file in one, none in the other)" if missing_file else
                    f"{difference[0]} ({_shown(difference[1])} vs {_shown(difference[2])})")
            raise ValueError(
                f"run {label!r}: {sources[first_of_row[label]]} and {sources[index]} differ in {what}; one row is one "
                "model evaluated one way: give each evaluation its own label="
            )
        row = metrics_at.setdefault(label, {})
        if cell in row:
            raise ValueError(f"run {label!r} has two results for {cell[0]} {cell[1]}")
        row[cell] = record["metrics"]
        column_first = results[first_of_column.setdefault(cell, index)]
        difference = _first_difference(column_first, record, _DATA_FIELDS)
        if difference:
            raise ValueError(
                f"column {cell[0]} {cell[1]}: {sources[first_of_column[cell]]} and {sources[index]} differ in {difference[0]} "
                f"({_shown(difference[1])} vs {_shown(difference[2])}): results on different data cannot share a column"
            )
    rows = {
        label: [
            _format_value(_cell_value(cells.get((column.group, column.split), {}), column.metric, protocol)) for column in columns
        ]
        for label, cells in metrics_at.items()
    }
    return protocol, columns, rows


def _markdown(columns: Sequence[_Column], rows: Mapping[str, Sequence[str]]) -> str:
    def escape(text: str) -> str:
        return text.replace("|", "\\|")

    titles = [" ".join(part for part in (c.group, c.split_title, c.metric_title) if part) for c in columns]
    lines = [
        "| " + " | ".join(escape(title) for title in ["Model", *titles]) + " |",
        "| :--- |" + " ---: |" * len(columns),
    ]
    lines += ["| " + " | ".join([escape(label), *cells]) + " |" for label, cells in rows.items()]
    return "\n".join(lines) + "\n"


_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters escaped, for use in a tabular cell."""
    return "".join(_LATEX_SPECIALS.get(char, char) for char in text)


def _latex_spanning_row(keys: Sequence[Any], titles: Sequence[str], first_cell: str, min_rule: int) -> tuple[str, str]:
    """A header row whose equal consecutive ``keys`` share one multicolumn cell, and the cmidrules
    under the cells that span at least ``min_rule`` columns."""
    cells, rules = [first_cell], []
    start = 0
    while start < len(keys):
        end = start
        while end + 1 < len(keys) and keys[end + 1] == keys[start]:
            end += 1
        title, width = latex_escape(titles[start]), end - start + 1
        cells.append(f"\\multicolumn{{{width}}}{{c}}{{{title}}}" if width > 1 else title)
        if width >= min_rule:
            rules.append(f"\\cmidrule(lr){{{start + 2}-{end + 2}}}")
        start = end + 1
    return " & ".join(cells) + r" \\", " ".join(rules)


def _latex(columns: Sequence[_Column], rows: Mapping[str, Sequence[str]]) -> str:
    """A booktabs tabular: dataset titles over split titles (over GRES metric names when there are any)."""
    with_metrics = any(column.metric_title for column in columns)
    groups, group_rules = _latex_spanning_row([c.group for c in columns], [c.group for c in columns], "Model", min_rule=1)
    splits, split_rules = _latex_spanning_row([(c.group, c.split) for c in columns], [c.split_title for c in columns], "", min_rule=2)
    lines = [f"\\begin{{tabular}}{{l{'c' * len(columns)}}}", r"\toprule", groups, group_rules, splits]
    if with_metrics:
        lines += [split_rules, " & ".join(["", *(latex_escape(c.metric_title) for c in columns)]) + r" \\"]
    lines.append(r"\midrule")
    lines += [" & ".join([latex_escape(label), *cells]) + r" \\" for label, cells in rows.items()]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def _protocol_note(protocol: str, metric: str) -> str:
    """One line saying which protocol a table's numbers come from, and which metric its RES cells show."""
    note = f"Protocol: {protocol} (metrics.md); RES and PhraseCut cells: {metric}"
    if protocol == "ssp_sam_release":
        note += (
            f"; cells are the release's own arithmetic (keys ending in '{RELEASE_SUFFIX.strip()}') where it differs: "
            "its N-acc also counts targets scored IoU 1 and is not ReLA's N-acc (the results JSON holds both)"
        )
    return note


def make_tables(
    results: Sequence[Mapping[str, Any]], metric: str = "mIoU", compact: bool = False, sources: Sequence[str] | None = None
) -> tuple[str, str]:
    """The paper's results table of ``results`` (records as written by :func:`write_results`), as (Markdown, LaTeX).

    One row per run (its "label", else its "model"), in order of first appearance. RES and
    PhraseCut columns show ``metric``; GRES columns gIoU, cIoU and N-acc. Under the ssp_sam_release
    protocol a cell shows the release's own number of that name when the results have one (its
    quirky N-acc included), so that the table is the one its paper prints. Values are x100 with two
    decimals; a missing result or metric is "-". ``compact`` drops the paper's column groups for
    which no run has a result. Both tables start with a line naming the protocol
    (a LaTeX comment there). ``sources`` name the records in messages (e.g. their files).

    Raises:
        ValueError: a record lacks a required key or is an OVSS result, the records are of different
            protocols, one run has two results for one cell, one label names two different checkpoints
            or results of other settings (precision, model settings, weight files), or one column would
            hold results on different data (dataset, split_by, image / sentence / referent counts, fingerprint).
    """
    protocol, columns, rows = _table_cells(results, metric, sources)
    if compact:
        filled_groups = {c.group for i, c in enumerate(columns) if any(cells[i] != MISSING for cells in rows.values())}
        keep = [i for i, c in enumerate(columns) if c.group in filled_groups]
        columns = [columns[i] for i in keep]
        rows = {label: [cells[i] for i in keep] for label, cells in rows.items()}
    note = _protocol_note(protocol, metric)
    return f"{note}\n\n{_markdown(columns, rows)}", f"% {note}\n{_latex(columns, rows)}"
