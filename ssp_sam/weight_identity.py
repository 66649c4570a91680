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
else ``~/.cache/ssp_sam``, under ``fingerprints/`` (the SAM embedding cache also remembers its file's sha256, read from this memo). The default hashing
reads a file once for both digests anything here compares (sha256, and md5, which Meta publishes SAM's files by), so
each version of a file is read once whichever is asked for first.

Released SSP-SAM checkpoints record no digest of their encoders' files, but the release names them: OpenAI's CLIP
and Meta's SAM ViT-H, published with digests. :func:`check_release_weight_files` warns when the files given differ.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError
from .fileio import write_json


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


# The digests the default hashing computes in its one pass over a file (see the module docstring).
DIGESTS = ("sha256", "md5")


def hash_weights_file_digests(
    path: str | os.PathLike, what: str = "weights", chunk_bytes: int = 1 << 20, algorithms: tuple[str, ...] = DIGESTS
) -> dict[str, str]:
    """Hex digests (``algorithms``) of a weight file, read once in chunks; a CheckpointError naming an unreadable file."""
    digests = {name: hashlib.new(name) for name in algorithms}
    try:
        with open(path, "rb") as file:
            for chunk in iter(lambda: file.read(chunk_bytes), b""):
                for digest in digests.values():
                    digest.update(chunk)
    except OSError as error:
        raise CheckpointError(f"{os.fspath(path)}: cannot read {what} ({error.strerror or error})") from error
    return {name: digest.hexdigest() for name, digest in digests.items()}


def hash_weights_file(path: str | os.PathLike, what: str = "weights", chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a weight file, read in chunks; a CheckpointError naming an unreadable file."""
    return hash_weights_file_digests(path, what, chunk_bytes, ("sha256",))["sha256"]


def remembered_sha256(
    path: str | os.PathLike, memo_dir: str | os.PathLike | None = None, hash_file: Callable[[str], str] | None = None
) -> str:
    """sha256 of a weight file, hashed once and remembered in ``memo_dir`` (default :func:`default_memo_dir`).

    The memo is keyed by the file's absolute path, size, mtime, inode and change time, so ranks and later runs read 64 hex
    digits instead of hashing gigabytes again; a lock makes concurrent first callers hash it once.
    ``hash_file`` (default: every digest of :data:`DIGESTS` in one pass, a CheckpointError naming an unreadable
    file) computes it; one given computes the sha256 alone, and only that is remembered.
    """
    hashes = (lambda file: {"sha256": hash_file(file)}) if hash_file is not None else None
    return remembered_digest(path, "sha256", memo_dir, hashes)


def remembered_digest(
    path: str | os.PathLike,
    algorithm: str,
    memo_dir: str | os.PathLike | None = None,
    hash_file: Callable[[str], Mapping[str, str]] | None = None,
) -> str:
    """A digest (one of :data:`DIGESTS`) of a weight file, remembered as :func:`remembered_sha256` remembers the sha256.

    The memo of a file version holds every digest computed for it, so a digest asked for after another was
    remembered costs one more pass only when the other came from a ``hash_file`` that computed it alone.
    ``hash_file`` returns ``{algorithm: hex digest}`` (default :func:`hash_weights_file_digests`).
    """
    hash_file = hash_file or hash_weights_file_digests
    absolute = os.path.abspath(path)
    memo = Path(memo_dir or default_memo_dir()) / f"{hashlib.sha1(os.fsencode(absolute)).hexdigest()[:16]}.json"
    try:
        stat = os.stat(absolute)
    except OSError:
        return hash_file(absolute)[algorithm]  # raises the error that names the file
    # Size and mtime alone can stay the same for other contents (a re-pointed symlink, an archive's
    # normalised timestamps): the inode and its change time, which no copy or extraction carries over, too.
    identity = {
        "path": absolute, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns,
        "inode": stat.st_ino, "device": stat.st_dev, "ctime_ns": stat.st_ctime_ns,
    }
    with exclusive_lock(memo.with_suffix(".lock")):
        known: dict[str, str] = {}
        try:
            remembered = json.loads(memo.read_text())
            if {key: remembered.get(key) for key in identity} == identity:
                known = {name: remembered[name] for name in DIGESTS if isinstance(remembered.get(name), str)}
        except (OSError, ValueError, AttributeError, TypeError):
            pass  # no memo yet, or a damaged one
        if algorithm in known:
            return known[algorithm]
        known.update(hash_file(absolute))
        try:
            write_json(memo, {**identity, **known})
        except OSError:
            pass  # a read-only memo: hashed again next time
        return known[algorithm]


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


# ----------------------------------------------------------------------------- the weights of the release


@dataclass(frozen=True)
class PublishedWeights:
    """A weight file as its authors publish it: what it is, and its digest ("sha256" or "md5", full hex)."""

    name: str
    algorithm: str
    digest: str


# The files SSP-SAM's released checkpoints were trained with (configs/model/ssp_sam_*.yaml), by preset and config key.
# OpenAI's download URLs carry the file's sha256 in their path (openai/CLIP clip/clip.py: ``expected_sha256 =
# url.split("/")[-2]``, then checked with hashlib.sha256; the same URLs in open_clip's pretrained.py). Meta's SAM
# file names carry the first 6 hex digits of the file's md5: its full md5, 4b8939a88964f0f4ff5f5b2642c598a6 for
# sam_vit_h_4b8939.pth, is what independent downloaders check with hashlib.md5 (and is an md5, not a sha256, prefix).
_SAM_VIT_H = PublishedWeights("Meta's SAM ViT-H (sam_vit_h_4b8939.pth)", "md5", "4b8939a88964f0f4ff5f5b2642c598a6")
RELEASE_WEIGHT_FILES: dict[str, dict[str, PublishedWeights]] = {
    "ssp_sam_224": {
        "model.clip_checkpoint": PublishedWeights(
            "OpenAI's CLIP ViT-B/16 (ViT-B-16.pt)", "sha256",
            "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
        ),
        "model.sam_checkpoint": _SAM_VIT_H,
    },
    "ssp_sam_336": {
        "model.clip_checkpoint": PublishedWeights(
            "OpenAI's CLIP ViT-L/14@336px (ViT-L-14-336px.pt)", "sha256",
            "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
        ),
        "model.sam_checkpoint": _SAM_VIT_H,
    },
}


def check_release_weight_files(preset: str, files: Mapping[str, str | None], checkpoint: str | os.PathLike) -> list[str]:
    """Warn about each weight file that is not the published one a released checkpoint was trained with.

    A CLIP or SAM of the right shapes but other weights (a LAION CLIP under OpenAI's key names, another SAM
    fine-tune) loads without any error and gives other masks. It is a warning, not an error: a user may
    pair a release with other encoders on purpose, and a file converted to another format (safetensors, a
    state dict) holds the same weights under another digest. One line on stderr per file, naming it.

    Args:
        preset: the release's preset ("ssp_sam_224" / "ssp_sam_336"); others have nothing to compare.
        files: ``{config key: path}`` of the files the model was built from (None, or a missing file: skipped).
        checkpoint: the released checkpoint, named in the warning.

    Returns:
        The warnings printed (empty when every file is the published one).
    """
    lines = []
    for key, published in RELEASE_WEIGHT_FILES.get(preset, {}).items():
        path = files.get(key)
        if path is None or not os.path.isfile(path):
            continue
        if remembered_digest(path, published.algorithm) == published.digest:
            continue
        lines.append(
            f"warning: {key}={path} is not {published.name}, which {Path(checkpoint).name} ({preset} release) was "
            f"trained with ({published.algorithm} differs from the published {published.digest[:12]}...): its masks "
            "may be wrong (a conversion of that file to another format also differs; then ignore this)"
        )
    for line in lines:
        print(line, file=sys.stderr)
    return lines
