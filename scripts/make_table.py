"""Lay results files written by scripts/eval.py out as the paper's table (Markdown and LaTeX).

    python scripts/make_table.py results/ other_run/refcoco_val.json [--metric oIoU] [--out-md table.md] [--out-tex table.tex]

Each argument is a results JSON file or a directory whose *.json files are all results (read in
name order), all of one evaluation protocol (results of different protocols are refused). One row
per run (its label), columns in the paper's order, then other datasets. The
Markdown table is printed; ``--out-md`` / ``--out-tex`` also write it and the LaTeX one (two files, neither
of them a results file read). A column holds results on one data only (dataset, split_by, counts and the
sentences' fingerprint agree) and a row the results of one model evaluated one way (checkpoint, weight files,
model settings, precision agree): the two files that differ are named. OVSS results are not tabulated here.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ssp_sam.cli import fail
from ssp_sam.engine.reporting import check_distinct_outputs, check_results, is_ovss_results, make_tables
from ssp_sam.errors import SSPSAMError
from ssp_sam.fileio import atomic_path
from ssp_sam.metrics import RES_KEYS
from ssp_sam.outputs import check_output_file


def _result_files(arguments: list[str]) -> list[Path]:
    files = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            found = sorted(path.glob("*.json"))
            if not found:
                fail(f"{path}: no *.json results files in this directory")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            fail(f"{path}: no such file or directory")
    return files


def _read_result(path: Path) -> dict:
    """One results file, checked; any problem ends the program with a message naming the file."""
    try:
        record = json.loads(path.read_text())
        if is_ovss_results(record):
            fail(
                f"{path}: an OVSS evaluation's results (protocol {record.get('protocol')}); make_table.py lays out the "
                "paper's referring-segmentation table (RES, GRES, PhraseCut results) only: read OVSS scores from their JSON"
            )
        check_results(record)
    except OSError as error:
        fail(f"{path}: cannot read ({error.strerror or error})")
    except UnicodeDecodeError:
        fail(f"{path}: not a text (JSON) file")
    except json.JSONDecodeError as error:
        fail(f"{path}: not valid JSON ({error})")
    except ValueError as error:
        fail(f"{path}: not a results file written by scripts/eval.py ({error})")
    return record


def _check_metric(metric: str, results: list[dict]) -> None:
    """``metric`` must be one the RES and PhraseCut results carry; otherwise list the ones they do. Without
    such results (GRES only) it must still be an RES metric's name, as the table's note names it.

    A protocol's variant of a metric ("mIoU (SSP-SAM release)") counts as the metric ("mIoU").
    """
    known = {}
    for record in results:
        if record.get("task") != "gres":
            known.update((name.split(" (")[0], None) for name, value in record["metrics"].items() if isinstance(value, float))
    if known and metric not in known:
        fail(f"--metric {metric}: not a metric of these results; they have {', '.join(known)}")
    if not known and metric not in RES_KEYS:
        fail(f"--metric {metric}: not a metric of RES or PhraseCut results (those are {', '.join(RES_KEYS)})")


def _write(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUNS", help="results JSON files, or directories of them")
    parser.add_argument("--metric", default="mIoU", help="metric of the RES and PhraseCut columns (default mIoU; e.g. oIoU)")
    parser.add_argument("--compact", action="store_true", help="leave out the paper's datasets without results")
    parser.add_argument("--out-md", help="also write the Markdown table to this file")
    parser.add_argument("--out-tex", help="also write the LaTeX table to this file")
    args = parser.parse_args()
    try:
        check_output_file(args.out_md, "--out-md")
        check_output_file(args.out_tex, "--out-tex")
        check_distinct_outputs({"--out-md": args.out_md, "--out-tex": args.out_tex})
    except SSPSAMError as error:
        fail(str(error))
    files = _result_files(args.runs)
    for key, out in (("--out-md", args.out_md), ("--out-tex", args.out_tex)):
        for path in files if out is not None else ():
            if os.path.realpath(out) == os.path.realpath(path) or (Path(out).exists() and os.path.samefile(out, path)):
                fail(f"{key}={out}: is {path}, a results file this table reads; give another file")

    results = [_read_result(path) for path in files]
    _check_metric(args.metric, results)
    try:
        markdown, latex = make_tables(results, metric=args.metric, compact=args.compact, sources=[str(path) for path in files])
    except ValueError as error:
        fail(str(error))
    print(markdown, end="")
    if args.out_md:
        _write(args.out_md, markdown)
    if args.out_tex:
        _write(args.out_tex, latex)


if __name__ == "__main__":
    main()
