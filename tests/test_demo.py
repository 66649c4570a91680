"""scripts/demo.py's checks before any work: it replaces only a data folder it made, and deletes nothing on bad arguments."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from ssp_sam.errors import ConfigError

from conftest import REPO


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("demo_script", REPO / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(demo, monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """demo.py's main with these arguments, as from the command line: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["demo.py", *args])
    with pytest.raises(SystemExit) as exit_info:
        demo.main()
    return exit_info.value.code, capsys.readouterr().err


def test_a_data_folder_the_demo_did_not_make_survives_and_the_demo_stops(demo, tmp_path, monkeypatch, capsys):
    """``--out .`` in the repository would point at its training data: refused in one line, nothing deleted."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.txt").write_text("months of annotation")
    code, err = _run(demo, monkeypatch, capsys, "--out", str(tmp_path), "--n-images", "1", "--checkpoint", str(tmp_path / "none"))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: --out: ")
    assert f"{tmp_path / 'data'} exists and was not made by the demo" in err
    assert (tmp_path / "data" / "precious.txt").read_text() == "months of annotation"


def test_an_out_that_is_a_file_is_one_line_error(demo, tmp_path, monkeypatch, capsys):
    (tmp_path / "results").write_text("not a folder")
    code, err = _run(demo, monkeypatch, capsys, "--out", str(tmp_path / "results"), "--n-images", "1", "--checkpoint", str(tmp_path / "none"))
    assert code == 2 and err == f"error: --out={tmp_path / 'results'}: is a file; give a folder\n"
    assert (tmp_path / "results").read_text() == "not a folder"


def test_a_missing_checkpoint_stops_the_demo_before_it_deletes_its_own_data(demo, tmp_path, monkeypatch, capsys):
    """The demo's own split (here one an earlier demo left) is deleted only once the checkpoint has loaded."""
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "images" / "earlier.png").write_bytes(b"x")
    (tmp_path / "data" / "manifest.json").write_text(json.dumps({"seed": demo.DEMO_SEED, "n_images": {"test": 40}}))
    args = ("--out", str(tmp_path), "--n-images", "1", "--checkpoint", str(tmp_path / "no_such_checkpoint"))
    code, err = _run(demo, monkeypatch, capsys, *args)
    assert code == 2 and err.count("\n") == 1 and "no_such_checkpoint" in err
    assert (tmp_path / "data" / "images" / "earlier.png").exists()


def test_only_a_demo_made_data_folder_is_replaced(demo, tmp_path):
    data = tmp_path / "data"
    assert demo.check_demo_data(data) is False  # nothing there yet
    demo.fresh_demo_data(data)
    assert (data / demo.DEMO_MARK).is_file()
    (data / "images").mkdir()
    (data / "images" / "old.png").write_bytes(b"x")
    demo.fresh_demo_data(data)  # a demo-made folder is replaced by an empty, marked one
    assert sorted(path.name for path in data.iterdir()) == [demo.DEMO_MARK]

    # A folder an earlier demo left before the mark existed: only the generator's files, the demo's seed, a test split.
    earlier = tmp_path / "earlier" / "data"
    (earlier / "images").mkdir(parents=True)
    (earlier / "shapeworld_gres").mkdir()
    (earlier / "manifest.json").write_text(json.dumps({"seed": demo.DEMO_SEED, "n_images": {"test": 40}}))
    assert demo.check_demo_data(earlier) is True
    (earlier / "precious.txt").write_text("mine")  # ... unless something else was put in it
    with pytest.raises(ConfigError, match="was not made by the demo"):
        demo.fresh_demo_data(earlier)
    assert (earlier / "precious.txt").exists()

    other_seed = tmp_path / "other" / "data"
    (other_seed / "images").mkdir(parents=True)
    (other_seed / "manifest.json").write_text(json.dumps({"seed": 7, "n_images": {"train": 5000, "test": 40}}))
    with pytest.raises(ConfigError, match="was not made by the demo"):
        demo.check_demo_data(other_seed)  # a ShapeWorld training set: not the demo's

    (tmp_path / "file").mkdir()
    (tmp_path / "file" / "data").write_text("a file called data")
    with pytest.raises(ConfigError, match="is not a folder the demo made"):
        demo.fresh_demo_data(tmp_path / "file" / "data")
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "data").symlink_to(data)
    with pytest.raises(ConfigError, match="a link"):
        demo.fresh_demo_data(tmp_path / "linked" / "data")
    assert (data / demo.DEMO_MARK).is_file()
