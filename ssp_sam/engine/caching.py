"""Fill the SAM embedding cache (ssp_sam/data/embedding_cache.py) before training or evaluation reads it.

:func:`build_cache` computes the entries one process lacks, in batches, while threads decode the
next images. :func:`remembered_fingerprint` hashes a SAM weight file once and remembers the hash in
the cache and in the machine-wide weight-file memo (keyed by path, size, mtime, inode and change time),
so no rank rehashes 2.5 GB at every start.
:func:`ensure_cache` is what training, ``scripts/eval.py`` and ``scripts/cache_embeddings.py`` call.

How N ranks (``torchrun`` processes, or the trainer's DDP ranks) share the work: each rank checks
which images lack a valid entry (a ``stat`` and a header read per image, so every rank can afford
the whole list) and computes those of ``images[rank::N]``, writing the entries itself. (Not
``missing[rank::N]``: that list depends on when a rank looked, and a rank starting a second late
sees the first one's new entries, so its list is shifted and some images would fall to no rank.
The interleaved partition of the image list is the same for every rank and still spreads any
contiguous run of missing images evenly.) Then it polls the files until the other ranks' entries
exist. No rank ever waits in a collective while others compute: a 30-minute barrier timeout, or
the NCCL watchdog, could otherwise kill a run whose rank 0 embeds 20k images alone, and file
polling needs no process group at all (so ``scripts/cache_embeddings.py`` runs under ``torchrun``
without one).

Why polling and not a barrier with a timeout: a timeout long enough for the slowest writer is a
guess, while the files show progress. A rank waits as long as new entries keep appearing; when
none has appeared for ``stall_timeout`` seconds (at least three times its own slowest batch), a
writer has died or started late, and the rank computes the entries still missing itself, after a
warning naming how many and the first one (two writers computing the same entry is harmless). So
a killed writer never stops the others, and the same command run again completes what it left.

An image that cannot be read stops every rank at once, naming it, instead of after the stall
timeout: a missing file (or one that cannot be stat'ed) is found by every rank in its own first pass
over the list, before any work; one that exists but cannot be decoded is found by the rank that owns
it, which leaves a marker beside the entries (``EmbeddingCache.mark_unreadable``) that the waiting
ranks look for at every poll (markers older than this call minus :data:`MARK_SKEW` are left by an
earlier command and ignored: the owner tries that image again).
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from ..data.embedding_cache import ABSENT, EmbeddingCache, EncoderIdentity, Slot, fill_command, module_fingerprint, storage_dtype
from ..errors import CacheError, ConfigError, ImageError
from .precision import Precision, resolve_precision
from ..image_io import load_image
from ..weight_identity import remembered_sha256
from .distributed import DistInfo

STALL_TIMEOUT = 300.0  # seconds without a new entry from the other writers before taking over
MARK_SKEW = 60.0  # seconds by which the writers of one command may start apart (for unreadable-image markers)
VERIFY_MODES = ("quick", "full")


def remembered_fingerprint(weights: str | os.PathLike, cache_root: str | os.PathLike) -> str:
    """sha256 of a SAM weight file, remembered in ``<cache_root>/fingerprints/`` (which also tells a fill
    command which file built the cache) on top of the machine-wide memo of
    :func:`ssp_sam.weight_identity.remembered_sha256`: ranks and later runs read 64 hex digits instead of
    hashing 2.5 GB again, and the one pass that hashes the file also remembers the md5 that the release
    check and the checkpoint record ask for, so the file is read once for all of them."""
    return remembered_sha256(weights, Path(cache_root) / "fingerprints", hash_file=lambda file: remembered_sha256(file))


def cache_dtype_for(cache_dtype: str, precision: Precision) -> str:
    """The cache dtype a run (evaluation or training) asks for: ``auto`` uses entries of any dtype, except
    that an fp32 run reads and writes fp32 entries only (others are recomputed), so that ``precision=fp32``
    gives fp32 numbers and not those of bf16 embeddings cached by an earlier bf16 run or by ``auto``'s
    choice on a native-bf16 machine."""
    return "fp32" if cache_dtype == "auto" and precision.name == "fp32" else cache_dtype


@dataclass
class BuildSummary:
    """What :func:`build_cache` did: entries computed anew, recomputed because invalid, already valid."""

    computed: int = 0
    repaired: int = 0
    cached: int = 0
    failed: list[str] = field(default_factory=list)  # ImageError messages of images not cached
    slowest_batch_seconds: float = 0.0


def _load(cache: EmbeddingCache, image: Path, recheck: bool) -> tuple[Slot, torch.Tensor] | ImageError | None:
    """(slot, SAM input (3, S, S)) of one image; None if ``recheck`` finds its entry written meanwhile.
    An image that cannot be decoded is marked for the other writers waiting for it."""
    try:
        slot = cache.slot(image)
        if recheck and cache.problem(slot) is None:
            return None  # another writer has done it
    except ImageError as error:
        return error
    try:
        pixels = cache.transform(load_image(image))[0]
    except ImageError as error:
        cache.mark_unreadable(slot, str(error))
        return error
    try:
        if cache.slot(image) != slot:
            return ImageError(f"{image}: the file changed while it was being read")
    except ImageError as error:
        return error
    return slot, pixels


def _prefetched_batches(
    cache: EmbeddingCache, todo: list[tuple[Path, str]], batch_size: int, threads: int
) -> Iterator[list[tuple[str, tuple[Slot, torch.Tensor] | ImageError | None]]]:
    """Per batch, (why it was todo, what :func:`_load` gave) per image; the next batch loads while one is encoded."""
    batches = [todo[start : start + batch_size] for start in range(0, len(todo), batch_size)]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append([(reason, pool.submit(_load, cache, image, reason == ABSENT)) for image, reason in batch])
            if len(pending) > 1:
                yield [(reason, future.result()) for reason, future in pending.popleft()]
        while pending:
            yield [(reason, future.result()) for reason, future in pending.popleft()]


def build_cache(
    cache: EmbeddingCache,
    images: Iterable[str | os.PathLike],
    image_encoder: nn.Module | Callable[[], nn.Module],
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    progress: bool = True,
    verify: str = "quick",
    threads: int = 4,
) -> BuildSummary:
    """Compute and store the embeddings of ``images`` that the cache lacks or holds invalid.

    Args:
        cache: where to store them (its ``dtype``, else what ``precision=auto`` picks on ``device``:
            bf16 on CUDA and on CPUs with native bf16, fp16 on GPUs without bf16, fp32 elsewhere).
        images: image files.
        image_encoder: SAM's image encoder, or a function that builds it, called only when some
            image needs computing (a complete cache never loads SAM's weights).
        batch_size: images per encoder call.
        device: where the encoder runs; a half storage dtype also runs it under autocast on CUDA,
            and on a CPU when that dtype is the native bf16.
        progress: show a tqdm bar.
        verify: how existing entries are checked: "quick" (headers: other encoder, other image,
            truncation) or "full" (also every payload's checksum).
        threads: threads that decode and resize images while the encoder runs.

    An entry absent at the start is skipped if another writer has written it by the time its
    batch is loaded. Removes temporary files of dead writers first.

    Raises:
        ImageError: images that could not be read, listed after every other image is stored.
        CacheError: the cache is read-only and some image lacks a valid entry.
    """
    if verify not in VERIFY_MODES:
        raise ConfigError(f"verify: expected one of {', '.join(VERIFY_MODES)}, got {verify!r}")
    for name, value in (("batch_size", batch_size), ("threads", threads)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}: expected a positive integer, got {value!r}")
    summary = BuildSummary()
    todo = []
    for image in dict.fromkeys(Path(image) for image in images):
        try:
            reason = cache.problem(cache.slot(image), full=verify == "full")
        except ImageError as error:
            summary.failed.append(str(error))
            continue
        if reason is None:
            summary.cached += 1
        else:
            todo.append((image, reason))
    if todo and cache.read_only:
        raise CacheError(_read_only_refusal(cache, todo))
    if todo:
        cache.remove_old_temporaries()
        _compute(cache, todo, image_encoder, summary, batch_size, torch.device(device), progress, threads)
    cache.last_build = summary
    if summary.failed:
        shown = "; ".join(summary.failed[:5]) + (" ..." if len(summary.failed) > 5 else "")
        raise ImageError(f"{len(summary.failed)} images could not be read and are not cached (the others are): {shown}")
    return summary


def _compute(
    cache: EmbeddingCache,
    todo: list[tuple[Path, str]],
    image_encoder: nn.Module | Callable[[], nn.Module],
    summary: BuildSummary,
    batch_size: int,
    device: torch.device,
    progress: bool,
    threads: int,
) -> None:
    """Encode ``todo`` (image, why it is todo) in batches on ``device`` and write each entry; counts into ``summary``."""
    if not isinstance(image_encoder, nn.Module):
        image_encoder = image_encoder()
    encoder_size = getattr(image_encoder, "img_size", cache.encoder.image_size)
    if encoder_size != cache.encoder.image_size:
        raise ConfigError(f"SAM image encoder: input size {encoder_size}, but the cache is for {cache.encoder.image_size}")
    image_encoder = image_encoder.to(device).eval()
    # What precision=auto picks: bf16 on CUDA and on CPUs with native bf16 (3.5x fp32 for ViT-B on an
    # AVX512-BF16 CPU, masks IoU 0.995, benchmarks/README.md), fp16 on GPUs without bf16, else fp32.
    native = resolve_precision("auto", device).dtype
    storage = cache.dtype or native
    autocast = storage != torch.float32 and (device.type == "cuda" or storage == native)
    bar = tqdm(total=len(todo), desc="SAM embeddings", unit="img", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    with bar, torch.inference_mode():
        for batch in _prefetched_batches(cache, todo, batch_size, threads):
            started = time.monotonic()
            summary.failed += [str(loaded) for _, loaded in batch if isinstance(loaded, ImageError)]
            summary.cached += sum(loaded is None for _, loaded in batch)
            good = [(reason, loaded) for reason, loaded in batch if isinstance(loaded, tuple)]
            if good:
                pixels = torch.stack([pixels for _, (_, pixels) in good]).to(device)
                with torch.autocast(device.type, dtype=storage, enabled=autocast):
                    embeddings = image_encoder(pixels).to(storage)
                for (reason, (slot, _)), embedding in zip(good, embeddings):
                    cache.write(slot, embedding)
                summary.computed += sum(reason == ABSENT for reason, _ in good)
                summary.repaired += sum(reason != ABSENT for reason, _ in good)
                summary.slowest_batch_seconds = max(summary.slowest_batch_seconds, time.monotonic() - started)
            bar.update(len(batch))


def _read_only_refusal(cache: EmbeddingCache, todo: list[tuple[Path, str]]) -> str:
    image, reason = todo[0]
    others = sorted(path.name for path in cache.root.iterdir() if path.is_dir() and path.name != "fingerprints") if cache.root.is_dir() else []
    held = f"; it holds embeddings of other SAM encoders or preprocessing only ({', '.join(others)})" if others and not cache.folder.is_dir() else ""
    return (
        f"{cache.root}: read-only cache without a valid embedding for {len(todo)} images "
        f"(e.g. {image}: {'no entry' if reason == ABSENT else reason}){held}; fill it where it is writable or give another cache_dir"
    )


def dataset_image_roots(dataset_cfg: Mapping) -> list[Path]:
    """Folders a dataset config's image paths are relative to: the cache keys images by their path inside one.

    ``image_root`` (REFER, gRefCOCO, PhraseCut layouts), else the JSONL file's folder (``path``'s,
    or ``<root>/<folder>``); for a merged set, its sources' folders.
    """
    if isinstance(dataset_cfg, DictConfig):
        dataset_cfg = OmegaConf.to_container(dataset_cfg, resolve=True)
    if dataset_cfg.get("format") == "merged":
        inherited = {"root": dataset_cfg.get("root")}
        return [root for source in dataset_cfg.get("sources") or [] for root in dataset_image_roots({**inherited, **source})]
    if dataset_cfg.get("image_root"):
        return [Path(dataset_cfg["image_root"])]
    if dataset_cfg.get("path"):
        return [Path(dataset_cfg["path"]).parent]
    if dataset_cfg.get("root") is not None and dataset_cfg.get("folder") is not None:
        return [Path(dataset_cfg["root"]) / str(dataset_cfg["folder"])]
    return []


def ensure_cache(
    root: str | os.PathLike,
    image_paths: Iterable[Path],
    image_roots: Iterable[Path],
    image_encoder: nn.Module | Callable[[], nn.Module],
    sam_variant: str,
    sam_checkpoint: str | None,
    image_size: int,
    device: torch.device,
    dist_info: DistInfo = DistInfo(),
    batch_size: int = 4,
    dtype: str = "auto",
    progress: bool = True,
    verify: str = "quick",
    threads: int = 4,
    stall_timeout: float = STALL_TIMEOUT,
    model_input_size: int | None = None,
    sam_custom: Mapping | None = None,
    dataset_arguments: str | None = None,
) -> EmbeddingCache:
    """Compute the embeddings the cache lacks, this rank's share first, and open the cache.

    Args:
        root: the cache directory.
        image_paths: every image the caller will read.
        image_roots: the dataset's image roots (:func:`dataset_image_roots`).
        image_encoder: SAM's image encoder, or a function that builds it. With ``sam_checkpoint``
            the function is called only if this rank has something to compute, so a complete
            cache never holds SAM's image encoder (2.5 GB of weights for ViT-H) in memory.
        sam_variant, sam_checkpoint, image_size: which encoder (the weight file's sha256 is
            remembered in the cache; without a file the encoder's own weights are hashed).
        device, batch_size, threads, progress: how this rank computes (progress on rank 0 only).
        dtype: "auto" (entries of any dtype are used; new ones as precision=auto: bf16 on CUDA and
            native-bf16 CPUs, fp16 on GPUs without bf16, else fp32)
            or "fp32" | "fp16" | "bf16" (entries of another dtype are recomputed).
        verify: "quick" (headers) or "full" (also payload checksums) for the entries present.
        stall_timeout: seconds without progress from the other writers before taking over.
        model_input_size: an OVSS model's input side: each entry is SAM's embedding of the image resized to it
            squared, exactly what the model computes itself (``ModelInputTransform``), in a folder of its own;
            None: SSP-SAM's input (the image's long side to SAM's, padded).
        sam_custom, dataset_arguments: a custom SAM's sizes and the dataset's command-line arguments
            (``dataset=refcoco dataset.root=...``), for the fill command that errors name (:func:`fill_command`).

    Returns:
        The cache; ``cache.last_build`` sums up this rank's work (``cached`` counts every image
        it did not compute).

    Raises:
        ImageError: an image that does not exist or cannot be stat'ed (every rank, before any work), or that
            cannot be decoded (the rank that owns it after its other images; the waiting ranks as soon as it
            has marked it).
    """
    if isinstance(stall_timeout, bool) or not isinstance(stall_timeout, (int, float)) or not stall_timeout > 0:
        raise ConfigError(f"stall_timeout: expected a positive number of seconds, got {stall_timeout!r}")
    if sam_checkpoint is None and not isinstance(image_encoder, nn.Module):
        image_encoder = image_encoder()  # its weights are the fingerprint
    started = time.time()
    fingerprint = remembered_fingerprint(sam_checkpoint, root) if sam_checkpoint is not None else module_fingerprint(image_encoder)
    identity = EncoderIdentity(sam_variant, fingerprint, image_size, model_input_size)
    wanted = storage_dtype(dtype)
    command = fill_command(root, identity, wanted, sam_checkpoint, dict(sam_custom) if sam_custom else None, dataset_arguments)
    cache = EmbeddingCache(root, identity, image_roots, wanted, fill_command=command)
    images = list(dict.fromkeys(Path(path) for path in image_paths))
    missing = cache.missing(images, full=verify == "full")
    _refuse_absent_images(cache, missing)
    built: list[nn.Module] = []

    def compute(share: list[Path]) -> BuildSummary:
        def encoder() -> nn.Module:  # built at most once per call of ensure_cache
            if not built:
                built.append(image_encoder if isinstance(image_encoder, nn.Module) else image_encoder())
            return built[0]

        return build_cache(cache, share, encoder, batch_size, device, progress and dist_info.is_main, verify, threads)

    mine = set(images[dist_info.rank :: dist_info.world_size])
    summary = compute([path for path in missing if path in mine])
    others = [path for path in missing if path not in mine]
    stall = max(stall_timeout, 3 * summary.slowest_batch_seconds)
    for still_missing in _wait_for_entries(cache, others, stall, full=verify == "full", since=started - MARK_SKEW):
        taken_over = compute(still_missing)
        summary.computed += taken_over.computed
        summary.repaired += taken_over.repaired
    summary.cached = len(images) - summary.computed - summary.repaired
    cache.last_build = summary
    return cache


def _refuse_absent_images(cache: EmbeddingCache, missing: list[Path]) -> None:
    """Stop before any work if an image to compute cannot be stat'ed: every rank sees it, so every rank stops."""
    absent = []
    for image in missing:
        try:
            cache.slot(image)
        except ImageError as error:
            absent.append(str(error))
    if absent:
        more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
        raise ImageError(f"{absent[0]}{more}; no SAM embedding was computed")


def _wait_for_entries(
    cache: EmbeddingCache, pending: list[Path], stall: float, full: bool, since: float = 0.0
) -> Iterator[list[Path]]:
    """Poll until ``pending`` have valid entries; yield what is still missing after ``stall`` seconds without progress.

    Polls at growing intervals (0.1 s doubling up to 5 s): a small job ends soon after the last
    entry appears, and a large one checks its long list rarely.

    Raises:
        ImageError: another writer marked one of ``pending`` unreadable at or after time ``since``.
    """
    last_change, interval = time.monotonic(), 0.1
    while pending:
        still = cache.missing(pending, full)
        unreadable = cache.unreadable(still, since) if still else None
        if unreadable:
            raise ImageError(f"{unreadable} (found by another cache writer; the entries of the other images are kept)")
        if len(still) < len(pending):
            last_change = time.monotonic()
        elif time.monotonic() - last_change > stall:
            print(
                f"warning: no new SAM embedding from the other cache writers for {stall:.0f} s; "
                f"computing the {len(still)} still missing here (e.g. {still[0]})",
                file=sys.stderr,
            )
            yield still
            last_change = time.monotonic()
            still = cache.missing(still, full)
        pending = still
        if pending:
            time.sleep(interval)
            interval = min(5.0, 2 * interval)
