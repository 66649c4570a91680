"""fileio: a save killed at any step is recovered to one complete directory; files respect the umask."""

from __future__ import annotations

import itertools
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ssp_sam.fileio import atomic_directory, atomic_path, recover_directory, write_json

OLD = {"weights": "old weights", "config": "old config"}
NEW = {"weights": "new weights", "config": "new config", "state": "new state"}
# Every file-system call a save makes goes through these; the child is killed before the k-th call.
FILE_SYSTEM_CALLS = ("replace", "rename", "mkdir", "rmdir", "unlink", "fsync", "chmod", "open")
FINISHED, KILLED = 0, 9


def save_killed_before_call(path: Path, kill_at: int) -> int:
    """Save NEW to ``path`` in a forked child that dies (os._exit, like kill -9: no cleanup runs)
    just before its ``kill_at``-th file-system call, or between two written files; returns its exit code."""
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            counter = itertools.count()

            def counted(function):
                def call(*args, **kwargs):
                    if next(counter) == kill_at:
                        os._exit(KILLED)
                    return function(*args, **kwargs)

                return call

            for name in FILE_SYSTEM_CALLS:
                setattr(os, name, counted(getattr(os, name)))
            between_files = counted(lambda: None)
            with atomic_directory(path) as tmp:
                for name, text in NEW.items():
                    between_files()
                    (tmp / name).write_text(text)
            code = FINISHED
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def contents(path: Path) -> dict[str, str]:
    return {file.name: file.read_text() for file in path.iterdir()}


def write(path: Path, files: dict[str, str]) -> None:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)


@pytest.mark.parametrize("previous", [OLD, None], ids=["replacing", "first save"])
def test_kill_at_every_step_of_a_save_then_recover(tmp_path, previous):
    outcomes = []
    for kill_at in range(200):
        run = tmp_path / f"kill_{kill_at}"
        write(run / "best", {"weights": "best"})  # a sibling that recovery must not touch
        (run / "notes.txt").write_text("mine")
        write(run / ".last.backup.tmp", {"x": "not ours"})  # a side name of another directory
        if previous is not None:
            write(run / "last", previous)
        code = save_killed_before_call(run / "last", kill_at)
        assert code in (FINISHED, KILLED)
        recover_directory(run / "last")
        assert sorted(p.name for p in run.iterdir()) == [".last.backup.tmp", "best", "last", "notes.txt"] or (
            previous is None and sorted(p.name for p in run.iterdir()) == [".last.backup.tmp", "best", "notes.txt"]
        ), (kill_at, sorted(p.name for p in run.iterdir()))
        assert contents(run / "best") == {"weights": "best"} and contents(run / ".last.backup.tmp") == {"x": "not ours"}
        found = contents(run / "last") if (run / "last").exists() else None
        assert found in (previous, NEW), (kill_at, found)  # complete, old or new, never a mix
        outcomes.append("new" if found == NEW else "old")
        assert recover_directory(run / "last") == [], "a second recovery found more to do"
        if code == FINISHED:
            break
    assert code == FINISHED, "the save never finished"
    assert len(outcomes) > 10  # the kill points really cover the steps of the save
    # Once the new version survived a kill, every later kill keeps it: the save never goes backwards.
    first_new = outcomes.index("new")
    assert outcomes[:first_new] == ["old"] * first_new and set(outcomes[first_new:]) == {"new"}
    assert 0 < first_new < len(outcomes) - 2, outcomes
    print(outcomes)  # kills before and after the point of no return


def test_save_between_the_renames_loses_nothing(tmp_path):
    """The observed failure: killed after moving last/ aside, before putting the new one in place."""
    write(tmp_path / "last", OLD)
    for kill_at in range(200):
        run = tmp_path / f"kill_{kill_at}"
        write(run / "last", OLD)
        save_killed_before_call(run / "last", kill_at)
        if not (run / "last").exists():
            break
    else:
        pytest.fail("no kill point left last/ missing")
    assert recover_directory(run / "last") != []
    assert contents(run / "last") == NEW


def test_error_in_the_block_keeps_the_old_directory(tmp_path):
    write(tmp_path / "last", OLD)
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "last") as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("disk full")
    assert contents(tmp_path / "last") == OLD
    assert [p.name for p in tmp_path.iterdir()] == ["last"]


def test_error_in_a_rename_leaves_one_complete_directory(tmp_path, monkeypatch):
    write(tmp_path / "last", OLD)
    real_replace, calls = os.replace, itertools.count()

    def failing_replace(source, target):
        if next(calls) == 2:  # the rename of the new directory onto last/
            raise OSError("I/O error")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="I/O error"):
        with atomic_directory(tmp_path / "last") as tmp:
            for name, text in NEW.items():
                (tmp / name).write_text(text)
    assert contents(tmp_path / "last") in (OLD, NEW)
    assert [p.name for p in tmp_path.iterdir()] == ["last"]


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700), (0o002, 0o664, 0o775)])
def test_outputs_respect_the_umask(tmp_path, umask, file_mode, dir_mode):
    previous = os.umask(umask)
    try:
        write_json(tmp_path / "summary.json", {"a": 1})
        with atomic_path(tmp_path / "table.md") as tmp:
            tmp.write_text("| a |\n")
        with atomic_directory(tmp_path / "last") as tmp:
            (tmp / "weights").write_text("w")
            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))  # safetensors writes 0600 whatever the umask
            (tmp / "sub").mkdir(mode=0o700)
            os.close(os.open(tmp / "sub" / "private", os.O_CREAT | os.O_WRONLY, 0o600))
    finally:
        os.umask(previous)
    for name in ("summary.json", "table.md", "last/weights", "last/model.safetensors", "last/sub/private"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == file_mode, name
    assert stat.S_IMODE((tmp_path / "last" / "sub").stat().st_mode) == dir_mode
    assert stat.S_IMODE((tmp_path / "last").stat().st_mode) == dir_mode
