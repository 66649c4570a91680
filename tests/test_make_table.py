"""The paper's results table from results files: column order, missing cells, escaping, bad files.

Expected headers and cells are written out by hand from the paper's layout (RefCOCO val/testA/
testB, RefCOCO+ val/testA/testB, RefCOCOg val(U)/test(U), ReferIt test, gRefCOCO val/testA/testB
with gIoU/cIoU/N-acc, PhraseCut test, then other datasets).
"""

from __future__ import annotations

import json
import runpy
import sys

import pytest

from conftest import REPO, run_script
from ssp_sam.engine.reporting import MISSING, latex_escape, make_tables

PAPER_HEADER = (
    ["Model", "RefCOCO val", "RefCOCO testA", "RefCOCO testB", "RefCOCO+ val", "RefCOCO+ testA", "RefCOCO+ testB",
     "RefCOCOg val(U)", "RefCOCOg test(U)", "ReferIt test"]
    + [f"gRefCOCO {split} {metric}" for split in ("val", "testA", "testB") for metric in ("gIoU", "cIoU", "N-acc")]
    + ["PhraseCut test"]
)


def _result(dataset: str, split: str, metrics: dict, label: str = "ours", task: str = "res", protocol: str = "standard") -> dict:
    return {"metrics": metrics, "dataset": dataset, "split": split, "task": task, "protocol": protocol, "model": "ssp_sam_224",
            "label": label}


def _markdown_rows(markdown: str) -> list[list[str]]:
    """Cells of every Markdown row but the alignment row (after the protocol line and a blank line)."""
    note, blank, *lines = markdown.strip().splitlines()
    assert note.startswith("Protocol: ") and blank == ""
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for i, line in enumerate(lines) if i != 1]


# Given in an order unlike the table's, to check the layout does not follow the input.
RESULTS = [
    _result("shapeworld", "test", {"mIoU": 0.9}),
    _result("phrasecut", "test", {"mIoU": 0.4321, "oIoU": 0.5}, task="phrasecut"),
    _result("grefcoco", "testB", {"gIoU": 0.6, "cIoU": 0.55, "N-acc": 0.123456}, task="gres"),
    _result("refcoco+", "testA", {"mIoU": 0.7}),
    _result("refcoco", "val", {"mIoU": 0.7777, "oIoU": 0.75}),
    _result("refcocog_umd", "test", {"mIoU": 0.66}),
    _result("refclef_unc", "test", {"mIoU": 0.5}),
    _result("shapeworld", "val", {"mIoU": 0.8}),
    _result("refcoco", "testB", {"mIoU": 0.1}, label="baseline"),
]


def test_columns_follow_the_paper_then_other_datasets():
    markdown, _ = make_tables(RESULTS)
    header, ours, baseline = _markdown_rows(markdown)
    assert header == PAPER_HEADER + ["shapeworld val", "shapeworld test"]
    expected_ours = (["ours", "77.77", "-", "-", "-", "70.00", "-", "-", "66.00", "50.00"]
                     + ["-"] * 6 + ["60.00", "55.00", "12.35"] + ["43.21", "80.00", "90.00"])
    assert ours == expected_ours
    assert baseline == ["baseline", "-", "-", "10.00"] + ["-"] * (len(header) - 4)


def test_metric_choice_applies_to_res_columns_only():
    markdown, _ = make_tables(RESULTS, metric="oIoU")
    assert markdown.splitlines()[0] == "Protocol: standard (metrics.md); RES and PhraseCut cells: oIoU"
    header, ours, _ = _markdown_rows(markdown)
    cells = dict(zip(header, ours))
    assert (cells["RefCOCO val"], cells["PhraseCut test"], cells["RefCOCO+ testA"]) == ("75.00", "50.00", "-")
    assert cells["gRefCOCO testB N-acc"] == "12.35"


def test_splits_the_paper_does_not_print_get_their_own_columns():
    """A result of a paper dataset's other split (PhraseCut val, refclef_unc testA) is shown after that
    dataset's paper splits, never dropped."""
    results = [_result("phrasecut", "val", {"mIoU": 0.3}, task="phrasecut"), _result("refclef_unc", "testA", {"mIoU": 0.2}),
               _result("refcoco", "val", {"mIoU": 0.5})]
    header, ours = _markdown_rows(make_tables(results)[0])
    assert header[header.index("ReferIt test") + 1] == "ReferIt testA" and header[-1] == "PhraseCut val"
    cells = dict(zip(header, ours))
    assert (cells["PhraseCut val"], cells["ReferIt testA"], cells["RefCOCO val"]) == ("30.00", "20.00", "50.00")


def test_one_label_for_two_checkpoints_is_refused():
    """Rows are keyed by label, which defaults to the model's name: two checkpoints of one architecture
    would share a row."""
    first = {**_result("refcoco", "val", {"mIoU": 0.5}), "checkpoint": "runs/a/best", "checkpoint_sha256": "aa"}
    second = {**_result("refcoco", "testA", {"mIoU": 0.6}), "checkpoint": "runs/b/best", "checkpoint_sha256": "bb"}
    with pytest.raises(ValueError, match=r"run 'ours' names two checkpoints \(runs/a/best .*runs/b/best .*own label="):
        make_tables([first, second])
    assert "60.00" in make_tables([first, {**second, "checkpoint_sha256": "aa"}])[0]


def test_latex_layout_and_escaping():
    results = [_result("refcoco", "val", {"mIoU": 0.5}, label="run_1 & 50% #2"), _result("grefcoco", "val", {"gIoU": 0.25}, task="gres")]
    _, latex = make_tables(results)
    note, *lines = latex.splitlines()
    assert note == "% Protocol: standard (metrics.md); RES and PhraseCut cells: mIoU"
    assert lines[0] == r"\begin{tabular}{l" + "c" * (len(PAPER_HEADER) - 1) + "}"
    assert lines[2].startswith(r"Model & \multicolumn{3}{c}{RefCOCO} & \multicolumn{3}{c}{RefCOCO+} & \multicolumn{2}{c}{RefCOCOg} & ReferIt")
    assert r"\multicolumn{9}{c}{gRefCOCO} & PhraseCut \\" in lines[2]
    assert r"& val(U) & test(U) & test & \multicolumn{3}{c}{val} &" in lines[4]
    assert r" & gIoU & cIoU & N-acc & gIoU" in lines[6]
    row = next(line for line in lines if line.startswith("run"))
    assert row.startswith(r"run\_1 \& 50\% \#2 & 50.00 & - & -")
    ssp = next(line for line in lines if line.startswith("ours"))
    assert ssp.split(" & ")[10] == "25.00"  # gRefCOCO val gIoU: the 10th value column
    assert lines[-2:] == [r"\bottomrule", r"\end{tabular}"]
    assert latex_escape(r"a\b~c^d{e}$f_g") == r"a\textbackslash{}b\textasciitilde{}c\textasciicircum{}d\{e\}\$f\_g"


def test_markdown_escapes_pipes_and_rejects_duplicate_cells():
    markdown, _ = make_tables([_result("refcoco", "val", {"mIoU": 0.5}, label="a|b")])
    assert markdown.splitlines()[4].startswith(r"| a\|b | 50.00 |")
    with pytest.raises(ValueError, match="two results for ReferIt test"):
        make_tables([_result("refclef_unc", "test", {"mIoU": 0.5}), _result("refclef_berkeley", "test", {"mIoU": 0.4})])
    with pytest.raises(ValueError, match="'metrics'"):
        make_tables([{"dataset": "refcoco", "split": "val", "model": "m"}])


def test_one_table_one_protocol():
    results = [_result("refcoco", "val", {"mIoU": 0.5}), _result("grefcoco", "val", {"gIoU": 0.4}, task="gres", protocol="rela"),
               _result("refcoco", "testA", {"mIoU": 0.6}, label="other")]
    with pytest.raises(ValueError, match=r"different protocols cannot share a table: standard \(ours refcoco val\), "
                                         r"rela \(ours grefcoco val\); make one table per protocol"):
        make_tables(results)
    with pytest.raises(ValueError, match="'protocol' missing.*written before protocols were named"):
        make_tables([{key: value for key, value in results[0].items() if key != "protocol"}])
    with pytest.raises(ValueError, match="unknown protocol 'lavt'"):
        make_tables([_result("refcoco", "val", {"mIoU": 0.5}, protocol="lavt")])


def test_release_protocol_table_shows_the_release_numbers():
    # The paper's gRefCOCO N-acc is the release's own count; under its protocol the table shows it (and its
    # mIoU), falling back to the standard key where the release has no number of that name (REC-acc).
    metrics = {"gIoU": 0.5, "gIoU (SSP-SAM release)": 0.6, "cIoU": 0.7, "cIoU (SSP-SAM release)": 0.7,
               "N-acc": 0.25, "N-acc (SSP-SAM release)": 0.75}
    results = [_result("grefcoco", "val", metrics, task="gres", protocol="ssp_sam_release"),
               _result("refcoco", "val", {"mIoU": 0.5, "mIoU (SSP-SAM release)": 0.55, "REC-acc": 0.8}, protocol="ssp_sam_release")]
    markdown, latex = make_tables(results, compact=True)
    header, row = _markdown_rows(markdown)
    cells = dict(zip(header, row))
    # GRES columns say whose arithmetic they show (metrics.md: "under names that say so")
    release = " (SSP-SAM release)"
    assert (cells[f"gRefCOCO val gIoU{release}"], cells[f"gRefCOCO val cIoU{release}"], cells[f"gRefCOCO val N-acc{release}"]) == ("60.00", "70.00", "75.00")
    assert cells["RefCOCO val"] == "55.00"
    # a result without the release's number shows none, never the standard one under the release's name
    lacking = [_result("grefcoco", "val", {key: value for key, value in metrics.items() if key != "cIoU (SSP-SAM release)"},
                       task="gres", protocol="ssp_sam_release")]
    cells = dict(zip(*_markdown_rows(make_tables(lacking, compact=True)[0])))
    assert cells[f"gRefCOCO val cIoU{release}"] == MISSING and cells[f"gRefCOCO val gIoU{release}"] == "60.00"
    assert dict(zip(*_markdown_rows(make_tables(results, metric="REC-acc", compact=True)[0])))["RefCOCO val"] == "80.00"
    assert markdown.startswith("Protocol: ssp_sam_release (metrics.md); RES and PhraseCut cells: mIoU; cells are the release's own arithmetic")
    assert "its N-acc also counts targets scored IoU 1 and is not ReLA's N-acc" in markdown.splitlines()[0]
    assert latex.startswith("% Protocol: ssp_sam_release")


def test_script_refuses_to_mix_protocols(tmp_path, monkeypatch, capsys):
    standard, rela = tmp_path / "a.json", tmp_path / "b.json"
    standard.write_text(json.dumps(_result("refcoco", "val", {"mIoU": 0.5})))
    rela.write_text(json.dumps(_result("refcoco", "testA", {"mIoU": 0.5}, protocol="rela")))
    status, out, err = _run_in_process(monkeypatch, capsys, str(standard), str(rela))
    assert (status, out) == (2, "")
    assert err == ("error: results of different protocols cannot share a table: standard (ours refcoco val), "
                   "rela (ours refcoco testA); make one table per protocol\n")


def test_script_reads_files_and_directories_and_writes_tables(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    for index, record in enumerate(RESULTS[:4]):
        (runs / f"{index}.json").write_text(json.dumps(record))
    single = tmp_path / "refcoco_val.json"
    single.write_text(json.dumps(RESULTS[4]))
    out_md, out_tex = tmp_path / "t" / "table.md", tmp_path / "t" / "table.tex"
    completed = run_script("make_table.py", str(runs), str(single), "--out-md", str(out_md), "--out-tex", str(out_tex))
    assert completed.returncode == 0, completed.stderr
    markdown, latex = make_tables(RESULTS[:5])
    assert completed.stdout.startswith(markdown)
    assert out_md.read_text() == markdown and out_tex.read_text() == latex


def _run_in_process(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """scripts/make_table.py run as __main__ in this process: (exit status, stdout, stderr)."""
    script = REPO / "scripts" / "make_table.py"
    monkeypatch.setattr(sys, "argv", [str(script), *args])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(script), run_name="__main__")
    captured = capsys.readouterr()
    return exited.value.code, captured.out, captured.err


@pytest.mark.parametrize(
    ("content", "expected"),
    [("{not json", "not valid JSON"), (json.dumps({"dataset": "refcoco", "split": "val", "model": "m"}), "'metrics'")],
)
def test_script_names_a_bad_file(tmp_path, monkeypatch, capsys, content, expected):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(RESULTS[0]))
    bad.write_text(content)
    status, out, err = _run_in_process(monkeypatch, capsys, str(good), str(bad))
    assert status == 2
    message = err.strip()
    assert message.startswith(f"error: {bad}:") and expected in message and "\n" not in message
    assert out == ""


def test_script_names_a_missing_path(tmp_path, monkeypatch, capsys):
    status, _, err = _run_in_process(monkeypatch, capsys, str(tmp_path / "nowhere.json"))
    assert status == 2
    assert err.strip() == f"error: {tmp_path / 'nowhere.json'}: no such file or directory"


# ---- one column, one data; one row, one model evaluated one way ------------------------------------


def _identified(dataset: str, split: str, label: str, **fields) -> dict:
    """A result as eval.py writes them now: data identity and settings beside the metrics."""
    record = {**_result(dataset, split, {"mIoU": 0.5}, label=label), "precision": "fp32", "n_images": 200, "n_samples": 1554,
              "checkpoint": "runs/a/best", "checkpoint_sha256": "a" * 64,
              "weight_files": {"model.sam_checkpoint": {"path": "/w/sam_vit_h.pth", "sha256": "5" * 64}},
              "model_config": {"name": "ssp_sam_224", "sam_checkpoint": "/w/sam_vit_h.pth", "no_target_pixels": 100,
                               "adapters": {"visual": True}},
              "data": {"root": "data", "split_by": "unc", "n_referents": 700, "sha256": "d" * 64}}
    for key, value in fields.items():
        if isinstance(value, dict) and value and isinstance(record.get(key), dict):  # {}: replaces
            record[key] = {**record[key], **value}
        else:
            record[key] = value
    return record


@pytest.mark.parametrize(
    ("other", "field", "values"),
    [
        ({"n_images": 20}, "n_images", "(200 vs 20)"),
        ({"n_samples": 150}, "n_samples", "(1554 vs 150)"),
        ({"data": {"n_referents": 699}}, "data.n_referents", "(700 vs 699)"),
        ({"data": {"sha256": "e" * 64}}, "data.sha256", "(dddddddddddd... vs eeeeeeeeeeee...)"),
        ({"data": {"split_by": "berkeley"}}, "data.split_by", "(unc vs berkeley)"),
    ],
)
def test_a_column_never_holds_results_on_different_data(other, field, values):
    """Two runs' results in one column must be on the same data: same counts, same fingerprint of the sentences,
    same refs file; the data's folder may differ (a copy elsewhere)."""
    first = _identified("shapeworld", "test", "run A")
    second = _identified("shapeworld", "test", "run B", **other)
    with pytest.raises(ValueError) as error:
        make_tables([first, second], sources=["a.json", "b.json"])
    assert str(error.value) == (f"column shapeworld test: a.json and b.json differ in {field} {values}: "
                                "results on different data cannot share a column")
    moved = _identified("shapeworld", "test", "run B", data={"root": "/elsewhere/data"})
    header, *rows = _markdown_rows(make_tables([first, moved])[0])
    assert header == ["Model", *PAPER_HEADER[1:], "shapeworld test"] and [row[-1] for row in rows] == ["50.00", "50.00"]


def test_referit_unc_and_berkeley_never_share_the_referit_column():
    unc = _identified("refclef_unc", "test", "A")
    berkeley = _identified("refclef_berkeley", "test", "B", data={"split_by": "berkeley"})
    with pytest.raises(ValueError, match=r"^column ReferIt test: unc.json and berk.json differ in dataset \(refclef_unc vs refclef_berkeley\)"):
        make_tables([unc, berkeley], sources=["unc.json", "berk.json"])


def test_old_results_files_are_read_with_their_unknown_fields_not_compared():
    """Files written before data identity and settings were recorded: what they lack is unknown, not a difference."""
    old = {key: value for key, value in _identified("shapeworld", "test", "old").items()
           if key not in ("data", "weight_files", "model_config", "precision")}
    header, *rows = _markdown_rows(make_tables([old, _identified("shapeworld", "test", "new")])[0])
    assert [row[0] for row in rows] == ["old", "new"]
    with pytest.raises(ValueError, match="differ in n_images"):  # what old files do hold is compared
        make_tables([{**old, "n_images": 199}, _identified("shapeworld", "test", "new")])


@pytest.mark.parametrize(
    ("other", "field"),
    [
        ({"weight_files": {"model.sam_checkpoint": {"path": "/w/sam_vit_h.pth", "sha256": "6" * 64}}},
         "weight_files.model.sam_checkpoint.sha256 (555555555555... vs 666666666666...)"),
        ({"weight_files": {}}, "model.sam_checkpoint (a weight file in one, none in the other)"),
        ({"model_config": {"no_target_pixels": 5}}, "model_config.no_target_pixels (100 vs 5)"),
        ({"model_config": {"adapters": {"visual": False}}}, "model_config.adapters.visual (True vs False)"),
        ({"precision": "bf16"}, "precision (fp32 vs bf16)"),
    ],
)
def test_a_row_never_mixes_weight_files_or_settings(other, field):
    """One label for evaluations of one release file with another SAM file, another no-target threshold or
    another precision would merge them into one row: refused, naming both files and the field."""
    val = _identified("refcoco", "val", "ours")
    test_a = _identified("refcoco", "testA", "ours", **other)
    with pytest.raises(ValueError) as error:
        make_tables([val, test_a], sources=["val.json", "testA.json"])
    assert str(error.value) == (f"run 'ours': val.json and testA.json differ in {field}; one row is one model evaluated "
                                "one way: give each evaluation its own label=")
    # the same weights from files that moved: one row
    moved = _identified("refcoco", "testA", "ours", weight_files={"model.sam_checkpoint": {"path": "/new/sam.pth", "sha256": "5" * 64}},
                        model_config={"sam_checkpoint": "/new/sam.pth"})
    _, row = _markdown_rows(make_tables([val, moved])[0])
    assert row[:3] == ["ours", "50.00", "50.00"]


def _write_results(folder, **records) -> list[str]:
    paths = []
    for name, record in records.items():
        path = folder / f"{name}.json"
        path.write_text(json.dumps(record))
        paths.append(str(path))
    return paths


def test_script_names_both_files_of_a_mixed_column(tmp_path, monkeypatch, capsys):
    a, b = _write_results(tmp_path, a=_identified("shapeworld", "test", "A"), b=_identified("shapeworld", "test", "B", n_images=20))
    status, out, err = _run_in_process(monkeypatch, capsys, a, b)
    assert (status, out) == (2, "")
    assert err == f"error: column shapeworld test: {a} and {b} differ in n_images (200 vs 20): results on different data cannot share a column\n"


def test_script_refuses_one_file_for_both_tables_and_a_table_over_its_input(tmp_path, monkeypatch, capsys):
    (a,) = _write_results(tmp_path, a=_identified("refcoco", "val", "A"))
    table = tmp_path / "table"
    status, out, err = _run_in_process(monkeypatch, capsys, a, "--out-md", str(table), "--out-tex", str(table))
    assert (status, out, err) == (2, "", f"error: --out-tex={table}: the same file as --out-md={table}; give each output its own file\n")
    assert not table.exists()
    status, out, err = _run_in_process(monkeypatch, capsys, str(tmp_path), "--out-md", a)
    assert (status, out, err) == (2, "", f"error: --out-md={a}: is {a}, a results file this table reads; give another file\n")
    assert json.loads((tmp_path / "a.json").read_text())["label"] == "A"


def test_script_checks_the_metric_name_without_res_results(tmp_path, monkeypatch, capsys):
    """GRES results alone: the RES metric is still checked, as the table's note names it."""
    (gres,) = _write_results(tmp_path, g=_result("grefcoco", "val", {"gIoU": 0.5, "cIoU": 0.4, "N-acc": 0.3}, task="gres"))
    status, out, err = _run_in_process(monkeypatch, capsys, gres, "--metric", "oIoUU")
    assert (status, out) == (2, "")
    assert err == "error: --metric oIoUU: not a metric of RES or PhraseCut results (those are mIoU, oIoU, Pr@0.5, Pr@0.6, Pr@0.7, Pr@0.8, Pr@0.9, REC-acc)\n"
    completed = run_script("make_table.py", gres, "--metric", "oIoU")
    assert completed.returncode == 0 and completed.stdout.startswith("Protocol: standard (metrics.md); RES and PhraseCut cells: oIoU")


def test_script_says_ovss_results_are_not_tabulated(tmp_path, monkeypatch, capsys):
    """An OVSS results file (as scripts/eval.py writes it for an OVSS checkpoint) is named as such, not as a
    referring result of an unknown protocol."""
    ovss = {"metrics": {"mIoU": 0.9, "fwIoU": 0.9, "pAcc": 0.9, "mACC": 0.9}, "per_class_iou": {"red": 0.9}, "n_images": 2,
            "protocol": "whole_image", "precision": "fp32", "dataset": "semseg", "split": "train", "model": "tiny",
            "variant": "sam_mi", "label": "tiny sam_mi", "ovss_model": {"name": "tiny"}, "checkpoint": "x", "command": "eval.py"}
    (path,) = _write_results(tmp_path, ovss=ovss)
    status, out, err = _run_in_process(monkeypatch, capsys, path)
    assert (status, out) == (2, "")
    assert err == (f"error: {path}: an OVSS evaluation's results (protocol whole_image); make_table.py lays out the paper's "
                   "referring-segmentation table (RES, GRES, PhraseCut results) only: read OVSS scores from their JSON\n")
    with pytest.raises(ValueError, match="an OVSS evaluation's results"):
        make_tables([ovss])
