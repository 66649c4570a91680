"""On-disk cache of SAM image embeddings, computed once per image with the frozen SAM encoder.

SSP-SAM never trains SAM's image encoder, so its output for an image never changes: training and
evaluation read it from this cache instead of running ViT-H, and no data-loader worker ever
builds a SAM encoder.

Layout of one cache (one folder per encoder, ``<root>/<fingerprint[:16]>/``)::

    cache.json          header: full fingerprint, embedding shape (C, h, w), dtype, image_size
    shard-00000.bin     append-only entries: a 32-byte entry header, then the raw embedding bytes
    shard-00001.bin     (one new shard per build session, and whenever a shard passes SHARD_BYTES)
    index.log           append-only index, one line per entry: key -> shard, offset, size, crc32
    writer.lock         held (flock) by the one process that writes

Why it survives ``kill -9`` at any instant: shards and the index only grow; an entry's bytes are
written and fsync'ed before its index line is appended (and fsync'ed), every index line carries
its own crc32 and a line without its final newline is ignored, so the index only ever points at
complete bytes. Whatever an interrupted build wrote after its last index line is never referenced
(a build appends to a fresh shard). A recomputed entry is appended again and its new index line
wins; the old bytes stay unused in their shard.

Why it catches corruption: each entry header repeats the payload's crc32, its size and the sha1
of its key. ``verify(full=False)`` checks sizes and headers (catches truncated shards), reads
(``get``) and ``verify(full=True)`` also check the payload's crc32 (catches flipped bits).

Why it suits many DataLoader workers: reads are ``os.pread`` on file descriptors opened lazily in
each process, with no lock; pickling a cache sends paths and the index, never embedding data.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import struct
import sys
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from tqdm import tqdm

from ..backbones.sam import SAMImageTransform, sam_weights_fingerprint
from ..errors import CacheError, ConfigError, ImageError
from ..fileio import write_json
from ..image_io import load_image

FORMAT = "ssp_sam.embedding_cache/1"
HEADER_FILE = "cache.json"
INDEX_FILE = "index.log"
LOCK_FILE = "writer.lock"
SHARD_PATTERN = re.compile(r"shard-(\d{5,})\.bin")
SHARD_BYTES = 1 << 30  # a writer starts a new shard past this size

# Entry header in a shard: magic, crc32 of the payload, payload size, sha1 of the key.
ENTRY_HEADER = struct.Struct("<4sII20s")
ENTRY_MAGIC = b"SSPE"

STORAGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
VERIFY_MODES = ("quick", "full", "none")
RERUN_HINT = "re-run scripts/cache_embeddings.py to recompute it"


def image_key(path: Path | str) -> str:
    """Cache key of an image file: sha1 (40 hex digits) of its resolved absolute path.

    Stable across runs on one machine and shared by every dataset that uses the same file
    (RefCOCO, RefCOCO+ and RefCOCOg share COCO images); moving the images changes the keys.
    """
    return hashlib.sha1(os.fsencode(str(Path(path).resolve()))).hexdigest()


def module_fingerprint(module: nn.Module) -> str:
    """Hex sha256 over ``module``'s state dict: every name, dtype, shape and the tensor bytes.

    Keys the cache for SAM encoders that have no weight file (e.g. embedded in our checkpoints);
    equal weights give equal fingerprints whatever device or file they came from.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


class IndexEntry(NamedTuple):
    """Where an embedding lives: its shard file name, byte offset of its entry header, payload size and crc32."""

    shard: str
    offset: int
    nbytes: int
    crc: int


@dataclass
class BuildSummary:
    """What :func:`build_cache` did: entries computed anew, found valid, and recomputed because corrupt."""

    computed: int = 0
    cached: int = 0
    repaired: int = 0
    failed: list[str] = field(default_factory=list)  # ImageError messages of images not cached


def _index_line(key: str, entry: IndexEntry) -> bytes:
    record = json.dumps([key, *entry], separators=(",", ":")).encode()
    return b"%08x %s\n" % (zlib.crc32(record), record)


def _key_digest(key: str) -> bytes:
    return hashlib.sha1(key.encode()).digest()


def _parse_index_line(line: bytes) -> tuple[str, IndexEntry] | None:
    """(key, entry) of one complete index line, or None if the line is damaged."""
    line_crc, _, record = line.partition(b" ")
    try:
        if int(line_crc, 16) != zlib.crc32(record):
            return None
        key, shard, offset, nbytes, crc = json.loads(record)
        return key, IndexEntry(shard, offset, nbytes, crc)
    except (ValueError, TypeError):
        return None


class EmbeddingCache:
    """Read access to the cached embeddings of one SAM image encoder.

    Args:
        root: folder holding the caches of all encoders (``cache_dir``).
        fingerprint: hex fingerprint of the encoder (``sam_weights_fingerprint`` of its weight
            file, or :func:`module_fingerprint`); the cache lives in ``root/fingerprint[:16]``.
        image_size: SAM's input side S, checked against the header when both are known.

    Raises:
        CacheError: the folder belongs to another encoder, or its header is unreadable.
    """

    def __init__(self, root: str | Path, fingerprint: str, image_size: int | None = None) -> None:
        if not isinstance(fingerprint, str) or not re.fullmatch(r"[0-9a-f]{16,}", fingerprint):
            raise ConfigError(f"fingerprint: expected at least 16 lowercase hex digits, got {fingerprint!r}")
        self.folder = Path(root) / fingerprint[:16]
        self.fingerprint = fingerprint
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CacheError(f"{self.folder}: cannot create the cache folder ({error.strerror or error})") from error
        if not (self.folder / HEADER_FILE).exists():
            write_json(self.folder / HEADER_FILE, self._header(None, None, image_size))
        self.image_size = image_size
        self.reload()
        if image_size is not None and self.image_size != image_size:
            raise CacheError(
                f"{self.folder}: cache of SAM embeddings for {self.image_size}px inputs, but image_size is {image_size}"
            )
        self._fds: dict[str, int] = {}
        self.last_build: BuildSummary | None = None

    # ------------------------------------------------------------------ header and index

    def _header(self, shape: tuple[int, ...] | None, dtype: torch.dtype | None, image_size: int | None) -> dict:
        return {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "shape": list(shape) if shape is not None else None,
            "dtype": DTYPE_NAMES[dtype] if dtype is not None else None,
            "image_size": image_size,
        }

    def _read_header(self) -> dict:
        path = self.folder / HEADER_FILE
        try:
            header = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise CacheError(f"{path}: unreadable cache header ({error}); delete {self.folder} to rebuild the cache") from error
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise CacheError(f"{path}: not an SSP-SAM embedding cache header (format {FORMAT})")
        shape, dtype = header.get("shape"), header.get("dtype")
        if dtype not in (None, *DTYPE_NAMES.values()) or not (shape is None or (isinstance(shape, list) and len(shape) == 3)):
            raise CacheError(f"{path}: malformed cache header (shape {shape!r}, dtype {dtype!r}); delete {self.folder} to rebuild")
        if header.get("fingerprint") != self.fingerprint:
            raise CacheError(
                f"{self.folder}: made by another SAM encoder (fingerprint {header.get('fingerprint')}, "
                f"expected {self.fingerprint}); use another cache_dir"
            )
        return header

    def reload(self) -> None:
        """Re-read the header and the index (to see entries another process has added since)."""
        header = self._read_header()
        self.shape = tuple(header["shape"]) if header["shape"] is not None else None
        names = {name: dtype for dtype, name in DTYPE_NAMES.items()}
        self.dtype = names[header["dtype"]] if header["dtype"] is not None else None
        if header["image_size"] is not None:
            self.image_size = header["image_size"]
        self._index = self._read_index()

    def _read_index(self) -> dict[str, IndexEntry]:
        """key -> entry from the index log; damaged lines and a torn last line are skipped."""
        try:
            data = (self.folder / INDEX_FILE).read_bytes()
        except FileNotFoundError:
            return {}
        index = {}
        for line in data.split(b"\n")[:-1]:  # what follows the last newline is a torn line
            parsed = _parse_index_line(line)
            if parsed is not None:
                index[parsed[0]] = parsed[1]
        return index

    def _write_header(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        write_json(self.folder / HEADER_FILE, self._header(shape, dtype, self.image_size))
        self.shape, self.dtype = shape, dtype

    # ------------------------------------------------------------------ reading

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def keys(self) -> list[str]:
        """Every key with an entry (valid or not: see :meth:`verify`)."""
        return list(self._index)

    def missing(self, keys: Iterable[str]) -> list[str]:
        """The given keys that have no entry (in the given order)."""
        return [key for key in keys if key not in self._index]

    def _fd(self, shard: str) -> int:
        """Read-only descriptor of a shard, opened on first use in this process."""
        fd = self._fds.get(shard)
        if fd is None:
            path = self.folder / shard
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as error:
                raise CacheError(f"{path}: cannot open cache shard ({error.strerror or error}); {RERUN_HINT}") from error
            self._fds[shard] = fd
        return fd

    @property
    def entry_nbytes(self) -> int | None:
        """Payload size of every entry (C * h * w * itemsize); None before the first entry."""
        if self.shape is None or self.dtype is None:
            return None
        return torch.Size(self.shape).numel() * self.dtype.itemsize

    def _entry_problem(self, key: str, entry: IndexEntry, data: memoryview, shard_size: int, full: bool) -> str | None:
        """Why ``entry`` is not a valid embedding of ``key`` (None if it is).

        ``data`` holds the bytes read at ``entry.offset``: the entry header, and the payload when
        ``full`` (only then is the crc32 checked).
        """
        if entry.offset + ENTRY_HEADER.size + entry.nbytes > shard_size:
            return "truncated (its shard ends before it)"
        magic, crc, nbytes, key_digest = ENTRY_HEADER.unpack(data[: ENTRY_HEADER.size])
        if magic != ENTRY_MAGIC or (crc, nbytes) != (entry.crc, entry.nbytes) or key_digest != _key_digest(key):
            return "corrupt (its entry header does not match the index)"
        if entry.nbytes != self.entry_nbytes:
            return f"of {entry.nbytes} bytes, not those of a {self.shape} {self.dtype} embedding"
        if full and zlib.crc32(data[ENTRY_HEADER.size : ENTRY_HEADER.size + entry.nbytes]) != entry.crc:
            return "corrupt (checksum mismatch)"
        return None

    def get(self, key: str) -> torch.Tensor:
        """The embedding of ``key`` as float32 (C, h, w) on the CPU.

        Raises:
            KeyError: no entry for ``key``.
            CacheError: the entry is truncated or corrupt (names the entry and its shard).
        """
        entry = self._index[key]
        fd = self._fd(entry.shard)
        buffer = bytearray(ENTRY_HEADER.size + entry.nbytes)
        os.preadv(fd, [buffer], entry.offset)
        problem = self._entry_problem(key, entry, memoryview(buffer), os.fstat(fd).st_size, full=True)
        if problem is not None:
            raise CacheError(f"{self.folder / entry.shard}: cache entry {key} is {problem}; {RERUN_HINT}")
        embedding = torch.frombuffer(buffer, dtype=self.dtype, offset=ENTRY_HEADER.size)
        return embedding.view(self.shape).float()

    def verify(self, keys: Iterable[str] | None = None, full: bool = False) -> list[str]:
        """Keys (of ``keys``, default all; keys without an entry are ignored) whose entries are damaged.

        ``full=False`` checks that each entry lies inside its shard and that its entry header
        matches the index; ``full=True`` also reads every payload and checks its crc32.
        """
        chosen = list(self._index) if keys is None else [key for key in keys if key in self._index]
        by_shard: dict[str, list[str]] = {}
        for key in chosen:
            by_shard.setdefault(self._index[key].shard, []).append(key)
        damaged = []
        for shard, shard_keys in by_shard.items():
            try:
                fd = self._fd(shard)
            except CacheError:
                damaged.extend(shard_keys)
                continue
            shard_size = os.fstat(fd).st_size
            for key in shard_keys:
                entry = self._index[key]
                data = os.pread(fd, ENTRY_HEADER.size + (entry.nbytes if full else 0), entry.offset)
                if self._entry_problem(key, entry, memoryview(data), shard_size, full) is not None:
                    damaged.append(key)
        return damaged

    # ------------------------------------------------------------------ processes

    def close(self) -> None:
        """Close the shard descriptors of this process (they are reopened on the next read)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        if getattr(self, "_fds", None):
            self.close()

    def __getstate__(self) -> dict:
        """Paths, header and index only: a DataLoader worker opens its own descriptors."""
        state = self.__dict__.copy()
        state["_fds"] = {}
        return state

    def __repr__(self) -> str:
        return f"EmbeddingCache({str(self.folder)!r}, entries={len(self)}, shape={self.shape}, dtype={self.dtype})"


class _CacheWriter:
    """The single writer of a cache: holds its lock, appends entries to a fresh shard, then indexes them.

    Entering takes ``writer.lock`` (released by the OS even on ``kill -9``), re-reads the index
    and cuts a torn last index line so that new lines start on a line boundary.
    """

    def __init__(self, cache: EmbeddingCache) -> None:
        self.cache = cache
        self._lock_fd: int | None = None
        self._shard_fd: int | None = None
        self._shard_name = ""
        self._shard_size = 0

    def __enter__(self) -> "_CacheWriter":
        folder = self.cache.folder
        self._lock_fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise CacheError(f"{folder}: another process is writing this cache (it holds {LOCK_FILE})") from None
        self.cache.reload()
        index_path = folder / INDEX_FILE
        if index_path.exists():
            data = index_path.read_bytes()
            complete = data.rfind(b"\n") + 1
            if complete < len(data):
                os.truncate(index_path, complete)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._shard_fd is not None:
            os.close(self._shard_fd)
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        os.close(self._lock_fd)

    def _open_new_shard(self) -> None:
        """Start the next shard file (never one an earlier, possibly interrupted, writer used)."""
        if self._shard_fd is not None:
            os.close(self._shard_fd)
        numbers = [int(match.group(1)) for path in self.cache.folder.iterdir() if (match := SHARD_PATTERN.fullmatch(path.name))]
        self._shard_name = f"shard-{max(numbers, default=-1) + 1:05d}.bin"
        self._shard_fd = os.open(self.cache.folder / self._shard_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        self._shard_size = 0
        directory_fd = os.open(self.cache.folder, os.O_RDONLY)
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)

    def append(self, keys: list[str], embeddings: torch.Tensor) -> None:
        """Store (B, C, h, w) ``embeddings`` (in the storage dtype) under ``keys``: data first, then index."""
        cache = self.cache
        shape, dtype = tuple(embeddings.shape[1:]), embeddings.dtype
        if cache.shape is None:
            cache._write_header(shape, dtype)
        elif (cache.shape, cache.dtype) != (shape, dtype):
            raise CacheError(f"{cache.folder}: holds {cache.shape} {cache.dtype} embeddings, cannot add {shape} {dtype} ones")
        if self._shard_fd is None or self._shard_size >= SHARD_BYTES:
            self._open_new_shard()

        chunks, lines, new_entries = [], [], {}
        offset = self._shard_size
        for key, embedding in zip(keys, embeddings.cpu().contiguous()):
            payload = embedding.reshape(-1).view(torch.uint8).numpy().tobytes()
            crc = zlib.crc32(payload)
            entry = IndexEntry(self._shard_name, offset, len(payload), crc)
            chunks += [ENTRY_HEADER.pack(ENTRY_MAGIC, crc, len(payload), _key_digest(key)), payload]
            lines.append(_index_line(key, entry))
            new_entries[key] = entry
            offset += ENTRY_HEADER.size + len(payload)

        _write_all(self._shard_fd, b"".join(chunks))
        os.fsync(self._shard_fd)
        self._shard_size = offset
        index_fd = os.open(cache.folder / INDEX_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            _write_all(index_fd, b"".join(lines))
            os.fsync(index_fd)
        finally:
            os.close(index_fd)
        cache._index.update(new_entries)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# ---------------------------------------------------------------------- building


def _storage_dtype(dtype: str, device: torch.device, cached: torch.dtype | None, folder: Path) -> torch.dtype:
    """The dtype to store (and, on CUDA, to compute) in: ``dtype``, or for "auto" the cache's or the device's."""
    if dtype == "auto":
        if cached is not None:
            return cached
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in STORAGE_DTYPES:
        raise ConfigError(f"dtype: expected one of auto, {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
    chosen = STORAGE_DTYPES[dtype]
    if cached is not None and cached != chosen:
        raise CacheError(
            f"{folder}: holds {DTYPE_NAMES[cached]} embeddings; dtype={dtype} would mix precisions "
            "(use dtype=auto or another cache_dir)"
        )
    return chosen


def _load_pixels(path: Path, transform: SAMImageTransform) -> torch.Tensor | ImageError:
    """SAM's input (3, S, S) for one image file, or the ImageError that names the file."""
    try:
        return transform(load_image(path))[0]
    except ImageError as error:
        return error


def _prefetched_batches(
    keys: list[str], images: Mapping[str, Path], transform: SAMImageTransform, batch_size: int, threads: int
) -> Iterator[tuple[list[str], list[torch.Tensor | ImageError]]]:
    """(keys, pixels or errors) per batch; the next batch is decoded by threads while one is encoded."""
    batches = [keys[start : start + batch_size] for start in range(0, len(keys), batch_size)]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append((batch, [pool.submit(_load_pixels, Path(images[key]), transform) for key in batch]))
            if len(pending) > 1:
                done_keys, futures = pending.popleft()
                yield done_keys, [future.result() for future in futures]
        while pending:
            done_keys, futures = pending.popleft()
            yield done_keys, [future.result() for future in futures]


def _check_input_size(image_encoder: nn.Module, transform: SAMImageTransform) -> nn.Module:
    encoder_size = getattr(image_encoder, "img_size", transform.image_size)
    if encoder_size != transform.image_size:
        raise ConfigError(f"transform: image_size {transform.image_size} differs from the encoder's input size {encoder_size}")
    return image_encoder


def build_cache(
    root: str | Path,
    images: Mapping[str, Path],
    image_encoder: nn.Module | Callable[[], nn.Module],
    transform: SAMImageTransform,
    fingerprint: str,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    dtype: str = "auto",
    progress: bool = True,
    verify: str = "quick",
    threads: int = 4,
) -> EmbeddingCache:
    """Compute the embeddings of ``images`` that the cache lacks (or holds damaged) and store them.

    Args:
        root: folder of the caches; this encoder's is ``root/fingerprint[:16]``.
        images: key (usually :func:`image_key` of the path) -> image file.
        image_encoder: SAM's image encoder, or a function that builds it, called only when some
            image lacks an embedding (so a complete cache never loads SAM's weights); moved to
            ``device`` and put in eval mode.
        transform: SAM's input pipeline; its image_size must be the encoder's.
        fingerprint: the encoder's fingerprint (see :class:`EmbeddingCache`).
        batch_size: images per encoder call and per flush to disk.
        device: where the encoder runs.
        dtype: storage dtype "fp32", "fp16", "bf16" or "auto" (the dtype the cache already
            holds; else bf16 on CUDA with bf16 support, fp16 on other CUDA, fp32 on CPU). On CUDA
            a half dtype also runs the encoder under autocast; on the CPU it runs in fp32.
        progress: show a tqdm bar (counts and rate).
        verify: check existing entries first: "quick" (sizes and headers: truncated shards),
            "full" (also every checksum: flipped bits) or "none"; damaged entries are recomputed.
        threads: threads that decode and resize images while the encoder runs.

    Returns:
        The cache; ``cache.last_build`` is the :class:`BuildSummary` of this call.

    Raises:
        ImageError: images that could not be read, all listed after every other image has been
            cached (a re-run computes only those).
        CacheError: another encoder's folder, another dtype in the cache, a concurrent writer.

    An interruption (even ``kill -9``) loses at most the batch in flight; re-running resumes.
    """
    if verify not in VERIFY_MODES:
        raise ConfigError(f"verify: expected one of {', '.join(VERIFY_MODES)}, got {verify!r}")
    for name, value in (("batch_size", batch_size), ("threads", threads)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}: expected a positive integer, got {value!r}")
    if isinstance(image_encoder, nn.Module):
        _check_input_size(image_encoder, transform)
    device = torch.device(device)
    cache = EmbeddingCache(root, fingerprint, image_size=transform.image_size)

    with _CacheWriter(cache) as writer:
        storage = _storage_dtype(dtype, device, cache.dtype, cache.folder)
        keys = list(dict.fromkeys(images))
        present = [key for key in keys if key in cache]
        damaged = set(cache.verify(present, full=verify == "full")) if verify != "none" else set()
        todo = [key for key in keys if key not in cache or key in damaged]
        summary = BuildSummary(cached=len(present) - len(damaged))
        if todo:
            if not isinstance(image_encoder, nn.Module):
                image_encoder = _check_input_size(image_encoder(), transform)
            image_encoder = image_encoder.to(device).eval()
            autocast = device.type == "cuda" and storage != torch.float32
            bar = tqdm(total=len(todo), desc="SAM embeddings", unit="img", disable=not progress, file=sys.stderr, dynamic_ncols=True)
            with bar, torch.inference_mode():
                for batch_keys, loaded in _prefetched_batches(todo, images, transform, batch_size, threads):
                    summary.failed += [str(item) for item in loaded if isinstance(item, ImageError)]
                    good = [(key, item) for key, item in zip(batch_keys, loaded) if not isinstance(item, ImageError)]
                    if good:
                        pixels = torch.stack([item for _, item in good]).to(device)
                        with torch.autocast(device.type, dtype=storage, enabled=autocast):
                            embeddings = image_encoder(pixels)
                        writer.append([key for key, _ in good], embeddings.to(storage))
                        summary.repaired += sum(key in damaged for key, _ in good)
                        summary.computed += sum(key not in damaged for key, _ in good)
                    bar.update(len(batch_keys))
                    bar.set_postfix(cached=summary.cached, failed=len(summary.failed), refresh=False)
    cache.last_build = summary
    if summary.failed:
        shown = "; ".join(summary.failed[:5]) + (" ..." if len(summary.failed) > 5 else "")
        raise ImageError(
            f"{len(summary.failed)} of {len(todo)} images could not be read and are not cached "
            f"(the other {len(todo) - len(summary.failed)} are): {shown}"
        )
    return cache


def sam_encoder_fingerprint(
    image_encoder: nn.Module | Callable[[], nn.Module], sam_checkpoint: str | os.PathLike | None = None
) -> str:
    """The cache fingerprint of a SAM encoder: of its weight file if it was loaded from one, else of its weights.

    Training and ``scripts/cache_embeddings.py`` both key the cache with this function, so they
    find the same folder. With ``sam_checkpoint`` given, the encoder is not looked at (it may be a
    function that would build it); without, it must be the module.
    """
    if sam_checkpoint is not None:
        return sam_weights_fingerprint(sam_checkpoint)
    return module_fingerprint(image_encoder)
