"""Evaluation results as files, and results files as the paper's table.

:func:`write_results` writes one JSON file per evaluation with everything metrics.md "Reporting"
asks for (every applicable metric, the protocol, dataset, split, model, checkpoint hash, image
count, the exact command), so that tables can be regenerated from files alone. :func:`make_tables`
lays any number of such files of one protocol out as the SSP-SAM paper does: one row per run;
columns RefCOCO val/testA/testB, RefCOCO+ val/testA/testB, RefCOCOg val(U)/test(U), ReferIt test,
gRefCOCO val/testA/testB (gIoU, cIoU, N-acc each) and PhraseCut test, then any other dataset (e.g.
ShapeWorld) with its splits. Results of different protocols are never put in one table.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import __version__
from ..checkpoint import WEIGHTS_FILE
from ..errors import CheckpointError
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


def command_line() -> str:
    """The exact command of this process, interpreter included, quoted for a POSIX shell."""
    return " ".join(shlex.quote(arg) for arg in (sys.executable, *sys.argv))


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a checkpoint's weights: ``model.safetensors`` of one of our directories, else the file itself."""
    path = Path(path)
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    try:
        return file_sha256(weights)
    except OSError as error:
        raise CheckpointError(f"{weights}: cannot read the checkpoint to hash it ({error.strerror or error})") from None


def write_results(
    path: str | os.PathLike,
    result: EvaluationResult,
    dataset_cfg: Mapping[str, Any],
    model_name: str,
    checkpoint_path: str | os.PathLike,
    command: str,
    label: str | None = None,
) -> dict[str, Any]:
    """Write the results JSON of one evaluation atomically; returns what was written.

    Keys: metrics, by_group, dataset and split (from ``dataset_cfg``), task, protocol, precision, model, label
    (the run's row in tables; the model name by default), checkpoint, checkpoint_sha256, n_images,
    n_samples, command, created (UTC, ISO 8601), ssp_sam_version.
    """
    record = {
        "metrics": dict(result.metrics),
        "by_group": {group: dict(values) for group, values in result.by_group.items()},
        "dataset": str(dataset_cfg["name"]),
        "split": str(dataset_cfg["split"]),
        "task": result.task,
        "protocol": result.protocol,
        "precision": result.precision,
        "model": model_name,
        "label": str(label) if label is not None else model_name,
        "checkpoint": str(checkpoint_path),
        "checkpoint_sha256": checkpoint_sha256(checkpoint_path),
        "n_images": result.n_images,
        "n_samples": result.n_samples,
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


def check_results(record: Any) -> None:
    """Raise ValueError unless ``record`` looks like a results file written by :func:`write_results`."""
    if not isinstance(record, Mapping):
        raise ValueError(f"expected a JSON object of results, got {type(record).__name__}")
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


def _table_cells(results: Sequence[Mapping[str, Any]], metric: str) -> tuple[str, list[_Column], dict[str, list[str]]]:
    """The table's protocol, its columns and, per run label (in order of first appearance), one
    formatted cell per column."""
    for record in results:
        check_results(record)
    protocol = _table_protocol(results)
    columns, group_of = _layout(results, metric)
    # GRES columns name their metric: under the release's arithmetic with the name that says so (metrics.md)
    columns = [
        replace(column, metric_title=f"{column.metric_title}{RELEASE_SUFFIX}")
        if column.metric_title and _shows_release_arithmetic(column.metric, protocol) else column
        for column in columns
    ]
    metrics_at: dict[str, dict[tuple[str, str], Mapping[str, Any]]] = {}
    checkpoint_of: dict[str, Mapping[str, Any]] = {}  # label -> its first record that names a checkpoint
    for record in results:
        label, cell = _row_label(record), (group_of[record["dataset"]], record["split"])
        if record.get("checkpoint_sha256"):
            first = checkpoint_of.setdefault(label, record)
            if first["checkpoint_sha256"] != record["checkpoint_sha256"]:
                raise ValueError(
                    f"run {label!r} names two checkpoints ({first.get('checkpoint')} for {first['dataset']} {first['split']}, "
                    f"{record.get('checkpoint')} for {record['dataset']} {record['split']}): give each evaluation its own label="
                )
        row = metrics_at.setdefault(label, {})
        if cell in row:
            raise ValueError(f"run {label!r} has two results for {cell[0]} {cell[1]}")
        row[cell] = record["metrics"]
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


def make_tables(results: Sequence[Mapping[str, Any]], metric: str = "mIoU", compact: bool = False) -> tuple[str, str]:
    """The paper's results table of ``results`` (records as written by :func:`write_results`), as (Markdown, LaTeX).

    One row per run (its "label", else its "model"), in order of first appearance. RES and
    PhraseCut columns show ``metric``; GRES columns gIoU, cIoU and N-acc. Under the ssp_sam_release
    protocol a cell shows the release's own number of that name when the results have one (its
    quirky N-acc included), so that the table is the one its paper prints. Values are x100 with two
    decimals; a missing result or metric is "-". ``compact`` drops the paper's column groups for
    which no run has a result. Both tables start with a line naming the protocol
    (a LaTeX comment there).

    Raises:
        ValueError: a record lacks a required key, the records are of different protocols, one
            run has two results for one cell, or one label names two different checkpoints.
    """
    protocol, columns, rows = _table_cells(results, metric)
    if compact:
        filled_groups = {c.group for i, c in enumerate(columns) if any(cells[i] != MISSING for cells in rows.values())}
        keep = [i for i, c in enumerate(columns) if c.group in filled_groups]
        columns = [columns[i] for i in keep]
        rows = {label: [cells[i] for i in keep] for label, cells in rows.items()}
    note = _protocol_note(protocol, metric)
    return f"{note}\n\n{_markdown(columns, rows)}", f"% {note}\n{_latex(columns, rows)}"
