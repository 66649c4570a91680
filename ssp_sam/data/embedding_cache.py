"""On-disk cache of SAM image embeddings: one checksummed file per image, any number of writers.

SSP-SAM never trains SAM's image encoder, so its output for an image never changes: training and
evaluation read it from this cache instead of running ViT-H, and no data-loader worker ever
builds a SAM encoder.

Layout::

    <cache_dir>/fingerprints/<id>.json         sha256 of a SAM weight file (ssp_sam/engine/caching.py)
    <cache_dir>/<variant>-<S>-<encoder id>/    one folder per SAM encoder and preprocessing
        <2 hex>/<40 hex>.emb                   one entry per image (in its current state)
        tmp/                                   entries being written

What an entry is valid for, and why nothing stale is ever read:

- The folder name hashes what the embedding depends on besides the image: the SAM variant, the
  fingerprint of its weights (sha256 of the weight file, or of the encoder's state dict) and the
  preprocessing (input size S, pixel mean and std, resize rule). Other weights: another folder.
  The OVSS models embed their own input, the image squashed to their input square (``model_input_size``,
  :class:`ssp_sam.backbones.sam_frames.ModelInputTransform`), not SSP-SAM's letterboxed image: their
  entries have another resize rule, hence a folder of their own per model input size.
- The file name hashes the image's key (its path relative to its dataset's image root, so a moved
  dataset keeps its cache) with the image file's size and modification time (ns). An image
  rewritten in place (same name, new pixels) gets a new file name: its old embedding can no longer
  be found. Size and mtime rather than a hash of the bytes: they cost one ``stat``, so every rank
  can check every image at every start and every read checks again (hashing would read the whole
  dataset, 3 GB for COCO, on every rank at every start). A copy that does not keep mtimes
  (``cp`` without ``-p``) only costs a recomputation; ``mv``, ``cp -p`` and ``rsync -a`` keep them.
  Fooled only by a rewrite that keeps both the size and the old mtime.
- Each entry's header repeats all of this (key, size, mtime, encoder, preprocessing) plus dtype,
  shape and the payload's crc32, and every read checks it, so a misplaced or damaged file is
  never used: a damaged entry is removed when read, and any later fill recomputes it. A cache
  opened for one dtype (an fp32 run's) also refuses, at every read, an entry of another dtype that
  a concurrent writer (``scripts/cache_embeddings.py dtype=bf16``) put there after the fill.
- An image a writer cannot decode leaves ``unreadable/<entry name>.txt`` (its one-line error), so
  that the other writers waiting for its entry stop at once naming it (``ssp_sam/engine/caching.py``).

Every error about a missing or damaged entry names a ``scripts/cache_embeddings.py`` command that
computes it (:func:`fill_command`: this ``cache_dir``, the SAM file and variant the cache was opened
with or whose fingerprint it remembers, and the dtype it requires).

Entry file: ``PREFIX`` (magic, header length, crc32 of the header), the header as JSON, then the
raw (C, h, w) embedding in its storage dtype (native byte order).

Why any number of writers is safe: an entry is written to ``tmp/`` under a name of its own,
fsync'ed, then renamed to its final name. Rename is atomic, so a reader sees no entry or a complete
one; two writers computing the same entry rename equal files and the last one wins; a writer
killed at any instant loses only its unfinished entries and leaves at most a temporary file, which
a later writer removes once it is an hour old (a live writer renames its own within seconds).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shlex
import struct
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from ..backbones.sam_frames import ModelInputTransform, SAMImageTransform
from ..errors import CacheError, ConfigError, ImageError

if TYPE_CHECKING:
    from ..engine.caching import BuildSummary

MAGIC = b"SSPEMB02"
PREFIX = struct.Struct("<8sII")  # magic, header length, crc32 of the header
STORAGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}
RESIZE_RULE = "ResizeLongestSide (PIL bilinear on uint8), zero padding right and bottom"
MODEL_INPUT_RESIZE_RULE = "to model_input_size squared, then to image_size squared (float bilinear, antialiased, both)"
TEMPORARY_MAX_AGE = 3600.0  # seconds; older temporary files belong to dead writers
ABSENT = "absent"
UNREADABLE_DIR = "unreadable"  # <folder>/unreadable/<entry name>.txt: an image a writer could not decode


def module_fingerprint(module: nn.Module) -> str:
    """Hex sha256 over ``module``'s state dict: every name, dtype, shape and the tensor bytes.

    Identifies SAM encoders that have no weight file (e.g. embedded in our checkpoints); equal
    weights give equal fingerprints whatever device or file they came from.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


@dataclass(frozen=True)
class EncoderIdentity:
    """What an embedding depends on besides the image: SAM's variant, weights and preprocessing."""

    variant: str  # vit_b | vit_l | vit_h | custom
    weights: str  # sha256 of the weight file, or module_fingerprint of the encoder
    image_size: int  # SAM's input side S
    # None: SSP-SAM's input (RESIZE_RULE); an OVSS model's input side: the image resized to it squared first
    # (MODEL_INPUT_RESIZE_RULE), as the model does, so its entries never mix with SSP-SAM's of the same image
    model_input_size: int | None = None

    def describe(self) -> dict:
        """Stored in every entry header and hashed into the folder name (SSP-SAM's keys as they always were)."""
        transform = SAMImageTransform(self.image_size)
        described = {
            "variant": self.variant,
            "weights": self.weights,
            "image_size": self.image_size,
            "pixel_mean": transform.pixel_mean.flatten().tolist(),
            "pixel_std": transform.pixel_std.flatten().tolist(),
            "resize": RESIZE_RULE,
        }
        if self.model_input_size is not None:
            described.update(resize=MODEL_INPUT_RESIZE_RULE, model_input_size=self.model_input_size)
        return described

    @property
    def folder_name(self) -> str:
        digest = hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()
        return f"{self.variant}-{self.image_size}-{digest[:16]}"


def _remembered_weight_file(root: Path, fingerprint: str) -> str | None:
    """The SAM weight file whose hash ``<root>/fingerprints/`` remembers as ``fingerprint``, if it still exists."""
    try:
        memos = sorted((root / "fingerprints").glob("*.json"))
    except OSError:
        return None
    for memo in memos:
        try:
            record = json.loads(memo.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("sha256") == fingerprint and os.path.isfile(str(record.get("path"))):
            return str(record["path"])
    return None


def _hydra_value(value: object) -> str:
    """``value`` (a mapping of numbers, strings, lists) as a Hydra command-line value, e.g. ``{a: 1, b: [3]}``."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_hydra_value(item)}" for key, item in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_hydra_value(item) for item in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def fill_command(
    root: str | os.PathLike,
    encoder: EncoderIdentity,
    dtype: torch.dtype | None = None,
    sam_checkpoint: str | os.PathLike | None = None,
    sam_custom: dict | None = None,
    dataset: str | None = None,
) -> str | None:
    """The ``scripts/cache_embeddings.py`` command that fills ``root`` with ``encoder``'s entries.

    ``sam_checkpoint``: the SAM weight file (default: the one whose fingerprint ``<root>/fingerprints/``
    remembers, if any; none for an encoder without a file, which only ``checkpoint=`` can name);
    ``sam_custom``: the sizes of a custom variant; ``dataset``: its dataset arguments (e.g.
    ``dataset=refcoco dataset.root=data``); ``dtype``: the dtype the reader requires (``dtype=fp32``).
    What is not known stays a ``<placeholder>``. None for an OVSS model's entries (``model_input_size``),
    which that script does not compute (the OVSS commands fill them themselves).
    """
    if encoder.model_input_size is not None:
        return None
    root = Path(root)
    words = ["python", "scripts/cache_embeddings.py", *(shlex.split(dataset) if dataset else [])]
    placeholders = [] if dataset else ["dataset=<its dataset config>"]
    words.append(f"cache_dir={root}")
    if sam_checkpoint is None:
        sam_checkpoint = _remembered_weight_file(root, encoder.weights)
    if sam_checkpoint is not None:
        words += [f"sam_checkpoint={sam_checkpoint}", f"sam_variant={encoder.variant}"]
        if encoder.variant == "custom":
            if sam_custom:
                words.append(f"sam_custom={_hydra_value(dict(sam_custom))}")
            else:
                placeholders.append("'sam_custom=<its sizes>'")
    else:
        placeholders.append("checkpoint=<the SSP-SAM checkpoint whose SAM image encoder this is>")
    if dtype is not None:
        words.append(f"dtype={next(name for name, kind in STORAGE_DTYPES.items() if kind == dtype)}")
    return " ".join([*(shlex.quote(word) for word in words), *placeholders])


class Slot(NamedTuple):
    """Where the embedding of one image, as the file is now, lives."""

    image: Path
    key: str  # path relative to the image root that holds it (absolute outside every root)
    state: tuple[int, int]  # the image file's (size in bytes, mtime in ns)
    file: Path


def storage_dtype(name: str) -> torch.dtype | None:
    """The dtype entries must have ("fp32", "fp16", "bf16"), or None for "auto" (any; new ones per device)."""
    if name == "auto":
        return None
    if name not in STORAGE_DTYPES:
        raise ConfigError(f"dtype: expected one of auto, {', '.join(STORAGE_DTYPES)}, got {name!r}")
    return STORAGE_DTYPES[name]


class EmbeddingCache:
    """The cached embeddings of one SAM encoder: read, check and write entries.

    Args:
        root: the cache directory (``cache_dir``); this encoder's entries are in
            ``root / encoder.folder_name``.
        encoder: the encoder's identity.
        image_roots: folders the datasets' image paths are relative to (keys are paths inside
            the deepest one that holds the image; absolute paths for images outside them all).
        dtype: the dtype every entry must have (a fill recomputes others, a read refuses them), or
            None to accept any (new entries then take what precision=auto picks on the device: bf16
            on CUDA and native-bf16 CPUs, fp16 on GPUs without bf16, fp32 elsewhere).
        read_only: never write or remove; default: whether ``root`` cannot be written.
        fill_command: the command that fills this cache, named in errors (default: :func:`fill_command`
            from what the cache knows).

    Pickling sends paths and settings only: each DataLoader worker reads files itself.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        encoder: EncoderIdentity,
        image_roots: Iterable[str | os.PathLike] = (),
        dtype: torch.dtype | None = None,
        read_only: bool | None = None,
        fill_command: str | None = None,
    ) -> None:
        self.root = Path(root)
        self.encoder = encoder
        self.folder = self.root / encoder.folder_name
        self.image_roots = tuple(sorted({os.path.abspath(r) for r in image_roots}, key=len, reverse=True))
        self.dtype = dtype
        self.read_only = not _writable(self.root) if read_only is None else read_only
        if encoder.model_input_size is None:
            self.transform = SAMImageTransform(encoder.image_size)
        else:  # the OVSS models' own preprocessing
            self.transform = ModelInputTransform(encoder.model_input_size, encoder.image_size)
        self._expected = encoder.describe()
        self.fill_command = fill_command
        self.last_build: BuildSummary | None = None  # set by ensure_cache

    def __repr__(self) -> str:
        return f"EmbeddingCache({str(self.folder)!r}, image_roots={self.image_roots}, dtype={self.dtype})"

    def key(self, image: str | os.PathLike) -> str:
        absolute = os.path.abspath(image)
        for root in self.image_roots:  # deepest first
            if absolute.startswith(root.rstrip(os.sep) + os.sep):
                return Path(os.path.relpath(absolute, root)).as_posix()
        return Path(absolute).as_posix()

    def slot(self, image: str | os.PathLike) -> Slot:
        """The entry of ``image`` as the file is now. Raises ImageError when it cannot be stat'ed."""
        try:
            stat = os.stat(image)
        except OSError as error:
            raise ImageError(f"{image}: cannot read image ({error.strerror or error})") from error
        key, state = self.key(image), (stat.st_size, stat.st_mtime_ns)
        name = hashlib.sha1(f"{key}\n{state[0]}\n{state[1]}".encode()).hexdigest()
        return Slot(Path(image), key, state, self.folder / name[:2] / f"{name}.emb")

    def fill_hint(self) -> str:
        """How a missing entry is computed: the command that failed, run again, or :func:`fill_command`'s."""
        command = self.fill_command or fill_command(self.root, self.encoder, self.dtype)
        return "re-running this command computes it" + (f", as does: {command}" if command else "")

    # ------------------------------------------------------------------ reading and checking

    def _inspect(self, slot: Slot, data: bytes | bytearray, file_size: int, full: bool) -> tuple[dict, int] | str:
        """(header, payload offset) of a valid entry, else why it is not valid.

        ``data`` starts at the file's first byte and holds at least the header; with ``full`` it
        is the whole file and the payload's crc32 is checked too.
        """
        try:
            magic, header_length, header_crc = PREFIX.unpack_from(data)
            offset = PREFIX.size + header_length
            raw = bytes(data[PREFIX.size : offset])
            if magic != MAGIC or len(raw) != header_length or zlib.crc32(raw) != header_crc:
                return "corrupt (damaged header)"
            header = json.loads(raw)
            dtype = DTYPES_BY_NAME[header["dtype"]]
            shape = header["shape"]
            if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(n, int) and n > 0 for n in shape)):
                return f"corrupt (embedding shape {shape!r} is not (C, h, w))"
            nbytes = shape[0] * shape[1] * shape[2] * dtype.itemsize
        except (struct.error, ValueError, KeyError, TypeError):
            return "corrupt (damaged header)"
        if header.get("encoder") != self._expected:
            return "made by another SAM encoder or preprocessing"
        if (header.get("key"), header.get("image")) != (slot.key, list(slot.state)):
            return f"the embedding of another image ({header.get('key')})"
        if file_size != offset + nbytes:
            return f"truncated ({file_size} bytes instead of {offset + nbytes})"
        if full and zlib.crc32(memoryview(data)[offset:]) != header.get("payload_crc32"):
            return "corrupt (checksum mismatch)"
        return header, offset

    def problem(self, slot: Slot, full: bool = False) -> str | None:
        """Why the entry of ``slot`` cannot be used (``ABSENT`` if there is none), None if it can.

        ``full=False`` reads the header only (wrong encoder, other image, truncation, another
        dtype than ``self.dtype``); ``full=True`` also reads the payload and checks its crc32.
        """
        try:
            with open(slot.file, "rb") as file:
                file_size = os.fstat(file.fileno()).st_size
                data = file.read() if full else file.read(PREFIX.size)
                if not full and len(data) == PREFIX.size:
                    data += file.read(PREFIX.unpack(data)[1])
        except FileNotFoundError:
            return ABSENT
        inspected = self._inspect(slot, data, file_size, full)
        if isinstance(inspected, str):
            return inspected
        stored = inspected[0]["dtype"]
        return f"stored as {stored}, not {DTYPE_NAMES[self.dtype]}" if self.dtype and stored != DTYPE_NAMES[self.dtype] else None

    def missing(self, images: Iterable[str | os.PathLike], full: bool = False) -> list[Path]:
        """The images (in the given order) without a valid entry; unreadable images count as missing."""
        result = []
        for image in images:
            try:
                if self.problem(self.slot(image), full) is not None:
                    result.append(Path(image))
            except ImageError:
                result.append(Path(image))
        return result

    def get(self, image: str | os.PathLike, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """The embedding of ``image``, (C, h, w) on the CPU, as ``dtype`` (None: as stored, e.g. fp16 or
        bf16, which halves what a data-loader worker hands over and what is copied to the GPU).

        Raises:
            CacheError: no entry for the image as it is now (never cached, or the file changed
                since), or a damaged entry (then removed, so that a fill recomputes it); the
                message names the image, the entry file and the command that computes it.
        """
        slot = self.slot(image)
        try:
            with open(slot.file, "rb") as file:
                status = os.fstat(file.fileno())
                data = bytearray(status.st_size)
                file.readinto(data)
        except FileNotFoundError:
            raise CacheError(
                f"{slot.image}: no SAM embedding in {self.folder} for this image as it is now (never cached, "
                f"or the file changed since); {self.fill_hint()}"
            ) from None
        inspected = self._inspect(slot, data, status.st_size, full=True)
        if isinstance(inspected, str):
            raise CacheError(f"{slot.file}: the cached SAM embedding of {slot.image} is {inspected}; {self._discard(slot.file, status.st_ino)}")
        header, offset = inspected
        if self.dtype is not None and header["dtype"] != DTYPE_NAMES[self.dtype]:
            # Valid, but not what this reader was promised (an fp32 run): another writer replaced it after the
            # fill checked it. Kept: it is that writer's entry, and removing it would only start a tug of war.
            raise CacheError(
                f"{slot.file}: the cached SAM embedding of {slot.image} is stored as {header['dtype']}, but this run reads "
                f"{DTYPE_NAMES[self.dtype]} entries only (another writer, e.g. scripts/cache_embeddings.py with another "
                "dtype, replaced it after the cache was checked); give concurrent runs of different precision each "
                "their own cache_dir, then re-run this command"
            )
        stored = torch.frombuffer(data, dtype=DTYPES_BY_NAME[header["dtype"]], offset=offset).view(header["shape"])
        return stored if dtype is None else stored.to(dtype)

    def _discard(self, file: Path, inode: int) -> str:
        """Remove a damaged entry (unless a writer has just replaced it); say how it is recomputed."""
        if self.read_only:
            return f"this cache is read-only: delete the file where it is writable; then {self.fill_hint()}"
        try:
            if os.stat(file).st_ino == inode:
                file.unlink()
        except OSError:
            pass
        return f"removed it; {self.fill_hint()}"

    # ------------------------------------------------------------------ images a writer could not read

    def _unreadable_mark(self, slot: Slot) -> Path:
        return self.folder / UNREADABLE_DIR / f"{slot.file.stem}.txt"

    def mark_unreadable(self, slot: Slot, message: str) -> None:
        """Leave ``message`` (one line naming the image) for the other writers waiting for this entry."""
        if self.read_only:
            return
        mark = self._unreadable_mark(slot)
        temporary = mark.with_name(f"{mark.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            mark.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(message.splitlines()[0] + "\n")
            os.replace(temporary, mark)
        except OSError:
            temporary.unlink(missing_ok=True)  # the others then find out by themselves, after their stall timeout

    def unreadable(self, images: Iterable[str | os.PathLike], since: float) -> str | None:
        """The message a writer left, at or after time ``since``, for one of ``images`` (as each is now), if any."""
        try:
            marks = {entry.name: entry for entry in os.scandir(self.folder / UNREADABLE_DIR) if entry.name.endswith(".txt")}
        except OSError:
            return None
        if not marks:
            return None
        for image in images:
            try:
                entry = marks.get(self._unreadable_mark(self.slot(image)).name)
                if entry is not None and entry.stat().st_mtime >= since:
                    return Path(entry.path).read_text().strip()
            except (ImageError, OSError):
                continue
        return None

    # ------------------------------------------------------------------ writing

    def write(self, slot: Slot, embedding: torch.Tensor) -> None:
        """Store one (C, h, w) embedding, in its dtype: a temporary file, fsync'ed, renamed into place."""
        if self.read_only:
            raise CacheError(f"{self.root}: read-only cache, cannot add the embedding of {slot.image}")
        payload = embedding.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header = json.dumps(
            {
                "key": slot.key,
                "image": list(slot.state),
                "encoder": self._expected,
                "dtype": DTYPE_NAMES[embedding.dtype],
                "shape": list(embedding.shape),
                "payload_crc32": zlib.crc32(payload),
            },
            sort_keys=True,
        ).encode()
        temporary = self.folder / "tmp" / f"{slot.file.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        temporary.parent.mkdir(parents=True, exist_ok=True)
        slot.file.parent.mkdir(exist_ok=True)
        try:
            with open(temporary, "xb") as file:
                file.write(PREFIX.pack(MAGIC, len(header), zlib.crc32(header)) + header + payload)
                file.flush()
                os.fsync(file.fileno())  # the bytes are on disk before the name points at them
            os.replace(temporary, slot.file)
        finally:
            temporary.unlink(missing_ok=True)
        self._unreadable_mark(slot).unlink(missing_ok=True)  # read after all (a transient failure)

    def remove_old_temporaries(self, max_age: float = TEMPORARY_MAX_AGE) -> int:
        """Delete temporary files of dead writers (older than ``max_age`` seconds); returns how many."""
        removed, now = 0, time.time()
        try:
            entries = list(os.scandir(self.folder / "tmp"))
        except FileNotFoundError:
            return 0
        for entry in entries:
            try:
                if entry.name.endswith(".tmp") and now - entry.stat().st_mtime > max_age:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                pass  # renamed or removed by its writer meanwhile
        return removed


def _writable(root: Path) -> bool:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(root, os.W_OK)
