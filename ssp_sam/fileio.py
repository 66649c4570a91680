"""Atomic file and directory writes: a reader never sees a half-written file, a crash loses nothing.

Files and directories created here get the permissions the user's umask gives a plain ``open`` or
``mkdir`` (``tempfile`` alone would make them private: 0600 and 0700).

Replacing a directory (a checkpoint) takes several steps; a process killed between any two of them
leaves a state that :func:`recover_directory` turns back into one complete directory. The steps,
for ``<dir>/last``::

    1. write everything into  <dir>/.last.save-<token>.tmp  (incomplete while it has this name)
    2. rename it to           <dir>/.last.save-<token>.new  (complete: fsynced, then renamed)
    3. rename last to         <dir>/.last.save-<token>.old  (if there was a last)
    4. rename .new to         <dir>/last
    5. delete                 <dir>/.last.save-<token>.old
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from glob import escape
from pathlib import Path
from typing import Any, Iterator

INCOMPLETE, COMPLETE, REPLACED = ".tmp", ".new", ".old"
SAVE_MARK = "save-"  # side names of a directory being replaced: .<name>.save-<token>.tmp|.new|.old


def _umask() -> int:
    """The process's umask: from /proc/self/status where Linux gives it, so no other thread can create
    a file in the moment a set-and-restore would leave the mask changed; elsewhere set and put back."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _chmod_as_created(path: Path, directory: bool) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would have given it under the umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _chmod_tree_as_created(root: Path) -> None:
    """:func:`_chmod_as_created` for everything under ``root``: some writers ignore the umask and make
    their files private (safetensors' ``save_file`` creates 0600), which would leave a checkpoint that
    others on a shared machine cannot read."""
    for folder, directories, files in os.walk(root):
        for name in directories:
            _chmod_as_created(Path(folder) / name, directory=True)
        for name in files:
            _chmod_as_created(Path(folder) / name, directory=False)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` to disk (so "complete" survives a power cut)."""
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(Path(folder) / name)
        _fsync(Path(folder))


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=INCOMPLETE, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    _chmod_as_created(tmp, directory=False)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path`` that replaces ``path`` when the block succeeds.

    The old directory (if any) is moved aside first and deleted only after the new one is in
    place. A kill at any moment leaves either the old or the new complete directory, possibly
    under a side name: :func:`recover_directory` (run before the next use) puts it back. An
    exception in the block leaves ``path`` as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{SAVE_MARK}", suffix=INCOMPLETE, dir=path.parent))
    _chmod_as_created(tmp, directory=True)
    try:
        yield tmp
        _chmod_tree_as_created(tmp)
        _fsync_tree(tmp)
        ready = tmp.with_suffix(COMPLETE)
        os.replace(tmp, ready)
        _fsync(path.parent)
        old = tmp.with_suffix(REPLACED)
        if path.exists():
            os.replace(path, old)
        os.replace(ready, path)
        _fsync(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        recover_directory(path)
        raise


def recover_directory(path: str | os.PathLike) -> list[str]:
    """Finish or undo a replacement of ``path`` by :func:`atomic_directory` that was cut short.

    A complete new directory (``.<name>.save-*.new``) is put in place; otherwise, when ``path`` is
    missing, the directory moved aside (``.<name>.save-*.old``) is put back. Incomplete new
    directories (``.tmp``) and superseded old ones are deleted. Only these side names are touched.

    Returns:
        one line per thing done (empty when there was nothing to recover).
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    side = {suffix: [] for suffix in (INCOMPLETE, COMPLETE, REPLACED)}
    prefix = f".{path.name}.{SAVE_MARK}"
    for entry in path.parent.glob(f"{escape(prefix)}*"):
        token = entry.name[len(prefix) : -len(entry.suffix) or None]
        if entry.suffix in side and token and "." not in token and entry.is_dir():
            side[entry.suffix].append(entry)
    by_age = lambda entries: sorted(entries, key=lambda entry: entry.stat().st_mtime)  # noqa: E731
    done = []
    for incomplete in side[INCOMPLETE]:
        shutil.rmtree(incomplete, ignore_errors=True)
        done.append(f"{path}: deleted the unfinished save {incomplete.name}")
    completed, replaced = by_age(side[COMPLETE]), by_age(side[REPLACED])
    if completed:
        newest = completed.pop()
        for stale in completed:
            shutil.rmtree(stale, ignore_errors=True)
        if path.exists():
            aside = newest.with_suffix(REPLACED)
            os.replace(path, aside)
            replaced.append(aside)
        os.replace(newest, path)
        done.append(f"{path}: finished the interrupted save (the new version is in place)")
    elif not path.exists() and replaced:
        os.replace(replaced.pop(), path)
        done.append(f"{path}: rolled back the interrupted save (the previous version is in place)")
    for stale in replaced:
        shutil.rmtree(stale, ignore_errors=True)
        done.append(f"{path}: deleted the superseded version {stale.name}")
    return done


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so a multi-gigabyte weights file is never held in memory.

    Raises:
        OSError: the file cannot be read (callers turn it into an error naming what the file is).
    """
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()
