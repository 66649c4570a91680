"""Which weight files a checkpoint's frozen encoders come from, by content.

A checkpoint of a model whose CLIP or SAM comes from a weight file stores only the path. Paths outlive
contents: the pretraining scripts write their result where the model configs read it, a user swaps
SAM ViT-B for ViT-H under the same name. Loaded later, such a checkpoint would run its trained modules
on other frozen features and give other numbers, with no error. So a checkpoint records each file's
sha256 beside its path (:func:`weight_file_record`), and loading checks the files it is given against
them (:func:`check_weight_files`): a moved or copied file passes, changed weights stop with an error
naming the file.

Hashing a 2.5 GB file takes seconds, so each hash is remembered per (absolute path, size, mtime, inode,
change time) in a memo directory (:func:`remembered_sha256`): ``$SSP_SAM_CACHE_HOME``, else ``$XDG_CACHE_HOME/ssp_sam``,
else ``~/.cache/ssp_sam``, under ``fingerprints/``; the SAM embedding cache keeps its own memo.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from .errors import CheckpointError
from .fileio import file_sha256, write_json


def default_memo_dir() -> Path:
    """Where weight-file hashes are remembered outside any cache directory."""
    root = os.environ.get("SSP_SAM_CACHE_HOME")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ssp_sam")
    return Path(root) / "fingerprints"


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an flock on ``path`` (the OS releases it if the holder dies); no lock where it cannot be created."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:  # a read-only memo: nothing will be written, so nothing to serialise
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def hash_weights_file(path: str | os.PathLike, what: str = "weights", chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a weight file, read in chunks; a CheckpointError naming an unreadable file."""
    try:
        return file_sha256(path, chunk_bytes)
    except OSError as error:
        raise CheckpointError(f"{os.fspath(path)}: cannot read {what} ({error.strerror or error})") from error


def remembered_sha256(
    path: str | os.PathLike, memo_dir: str | os.PathLike | None = None, hash_file: Callable[[str], str] | None = None
) -> str:
    """sha256 of a weight file, hashed once and remembered in ``memo_dir`` (default :func:`default_memo_dir`).

    The memo is keyed by the file's absolute path, size, mtime, inode and change time, so ranks and later runs read 64 hex
    digits instead of hashing gigabytes again; a lock makes concurrent first callers hash it once.
    ``hash_file`` (default: sha256 in chunks, a CheckpointError naming an unreadable file) computes it.
    """
    hash_file = hash_file or hash_weights_file
    absolute = os.path.abspath(path)
    memo = Path(memo_dir or default_memo_dir()) / f"{hashlib.sha1(os.fsencode(absolute)).hexdigest()[:16]}.json"
    try:
        stat = os.stat(absolute)
    except OSError:
        return hash_file(absolute)  # raises the error that names the file
    # Size and mtime alone can stay the same for other contents (a re-pointed symlink, an archive's
    # normalised timestamps): the inode and its change time, which no copy or extraction carries over, too.
    identity = {
        "path": absolute, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns,
        "inode": stat.st_ino, "device": stat.st_dev, "ctime_ns": stat.st_ctime_ns,
    }
    with exclusive_lock(memo.with_suffix(".lock")):
        try:
            remembered = json.loads(memo.read_text())
            if {key: remembered.get(key) for key in identity} == identity and isinstance(remembered.get("sha256"), str):
                return remembered["sha256"]
        except (OSError, ValueError, AttributeError):
            pass  # no memo yet, or a damaged one
        digest = hash_file(absolute)
        try:
            write_json(memo, {**identity, "sha256": digest})
        except OSError:
            pass  # a read-only memo: hashed again next time
        return digest


def weight_file_record(files: Mapping[str, str | None]) -> dict[str, dict[str, str]]:
    """``{config key: {"path": ..., "sha256": ...}}`` of the weight files named (None: not from a file)."""
    return {key: {"path": str(path), "sha256": remembered_sha256(path)} for key, path in files.items() if path is not None}


def check_weight_files(recorded: object, files: Mapping[str, str | None], checkpoint: str | os.PathLike) -> None:
    """The weight files given now must hold what the checkpoint was trained with.

    Args:
        recorded: the checkpoint's ``weight_files`` entry (:func:`weight_file_record`; absent in
            checkpoints written before it existed, which cannot be checked).
        files: ``{config key: path}`` of the files the model is about to be built from (None: not a file).
        checkpoint: named in the error.

    Raises:
        CheckpointError: a file whose sha256 differs from the recorded one.
    """
    if not isinstance(recorded, Mapping):
        return
    for key, path in files.items():
        entry = recorded.get(key)
        if path is None or not isinstance(entry, Mapping) or not isinstance(entry.get("sha256"), str):
            continue
        if not os.path.isfile(path):
            continue  # the builder names a missing file with what it should hold
        digest = remembered_sha256(path)
        if digest != entry["sha256"]:
            raise CheckpointError(
                f"{checkpoint}: trained with {key}={entry.get('path')} (sha256 {entry['sha256'][:12]}...), but "
                f"{key}={path} holds other weights (sha256 {digest[:12]}...); give the file it was trained with"
            )
