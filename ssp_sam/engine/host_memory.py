"""Keep freed host memory inside the process, so large CPU tensors do not page-fault at every step.

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and
returns it to the kernel on free. A CPU training step of SSP-SAM-224 at batch 8 allocates dozens of
such tensors (SAM decoder activations of (8, 32, 256, 256) are 64 MiB) and the kernel zero-fills
every page of each one again: about a million page faults and a third of the step's time here
(benchmarks/README.md, bench_train_step). With mmap switched off and the heap never trimmed, freed
blocks are reused by the next step, as the caching allocator does on a GPU.

The cost is that the process keeps its peak heap until it exits, which is what a training or
evaluation run needs anyway. Only the entry points of long CPU runs call this; the library never
changes the allocator of a program that imports it.

One interaction needs care: data-loader workers are forked from the trainer, and every page the
trainer rewrites after a fork is copied, the workers keeping the old copy, shared among them: a
fixed cost whatever the worker count. The kept free heap is the largest such region once a step
has run (the next step's activations rewrite it), and the Python objects alive at the fork come
next (reference counts and the cyclic garbage collector write into them). So the trainer forks its
persistent workers once, inside :func:`shared_with_forked_workers`, which lasts until training ends.
"""

from __future__ import annotations

import ctypes
import gc
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# Free memory at the top of the heap is returned to the kernel only above this (mallopt takes an int).
_TRIM_THRESHOLD_BYTES = 2**31 - 1
_DEFAULT_MMAP_MAX = 65536  # glibc's defaults (malloc.c: DEFAULT_MMAP_MAX, DEFAULT_TRIM_THRESHOLD)
_DEFAULT_TRIM_THRESHOLD_BYTES = 128 * 1024


def _glibc_function(name: str, argtypes: list) -> Callable[..., int] | None:
    """The C library's ``name`` (returning int), or None off Linux or in a C library without it (musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function


def keep_freed_host_memory() -> bool:
    """Tell glibc's malloc to serve large blocks from the heap and never trim it.

    Returns True when the setting took effect, False where it cannot (not Linux, or a C library
    without ``mallopt`` such as musl): everything still works there, only slower on CPU.
    """
    mallopt = _glibc_function("mallopt", [ctypes.c_int, ctypes.c_int])
    if mallopt is None:
        return False
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES) == 1


def default_host_memory_in_worker(worker_id: int = 0) -> None:
    """A data-loader worker's ``worker_init_fn``: glibc's own malloc settings again, and the free heap returned.

    A worker inherits :func:`keep_freed_host_memory` from the trainer it is forked from, and so would keep
    the high-water mark of every image, embedding and batch it ever decoded as private memory for the whole
    run (heap only, never trimmed). It gains nothing from that: it makes no large activations, only reads and
    collates. So large blocks are mapped and unmapped again (``M_MMAP_MAX`` 65536, glibc's default), and free
    heap above 128 KiB (glibc's default trim threshold) goes back to the kernel.
    """
    mallopt = _glibc_function("mallopt", [ctypes.c_int, ctypes.c_int])
    if mallopt is None:
        return
    mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
    mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD_BYTES)
    release_freed_host_memory()


def release_freed_host_memory() -> bool:
    """Give the free pages of the heap back to the kernel now (glibc ``malloc_trim(0)``).

    Called before forking data-loader workers: pages that are not there cannot be duplicated by
    copy-on-write. The next step faults them in once. Returns False where glibc is not available.
    """
    malloc_trim = _glibc_function("malloc_trim", [ctypes.c_size_t])
    if malloc_trim is None:
        return False
    malloc_trim(0)
    return True


@contextmanager
def shared_with_forked_workers(enabled: bool = True) -> Iterator[None]:
    """Around the life of forked data-loader workers: fewer parent pages copied on write.

    On entry the free heap goes back to the kernel (:func:`release_freed_host_memory`) and the
    objects alive now move to the garbage collector's permanent generation (``gc.freeze``), so
    collections during the epoch do not write into them; on exit they are collected normally again.
    Nested uses (an evaluation's workers forked during a training epoch's) freeze what is new and
    leave the outer workers' objects frozen until the outermost use ends.
    """
    global _depth
    if not enabled:
        yield
        return
    release_freed_host_memory()
    gc.freeze()
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            gc.unfreeze()


_depth = 0  # shared_with_forked_workers uses now open
