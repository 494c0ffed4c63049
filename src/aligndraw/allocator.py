"""Keeping freed memory: glibc's (and numpy's) allocation settings for a process that runs a
model batch after batch on the CPU.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves a block above its
mmap threshold (128 KiB at first, raised as blocks are freed, at most 32 MiB) with fresh pages
from the kernel and returns them when the block is freed, and it gives freed heap memory back
once more than twice that threshold is free at the top. A training step frees and takes back
the same buffers every step, so they are page-faulted in afresh each time (thousands of faults
a step; measured, with what keeping them gains, in ``docs/performance-log.md``, item 20).

``keep_freed_memory`` raises both thresholds for the process, so that freed blocks stay in the
heap for the next step: mmap threshold 1 GiB (or, where glibc refuses that, its documented
maximum of 32 MiB), trim threshold INT_MAX (the heap's top is given back only once more than
2 GiB is free there). The cost: the process keeps the memory it freed, and the heap can hold
more than the live data while freed blocks of one size wait to be taken again. It changes
the whole process and cannot be undone. It also stops numpy from marking large arrays for
transparent huge pages (``numpy_huge_pages_off``), unless ``NUMPY_MADVISE_HUGEPAGE`` is set.
The trainer calls it on the CPU, and so do the other commands of ``aligndraw.cli`` that run a
model batch after batch (``MODEL_COMMANDS``), unless ``ALIGNDRAW_KEEP_FREED_MEMORY=0``
(``wanted_on``). Under
another ``malloc`` (jemalloc or tcmalloc preloaded) glibc's settings do nothing, though
``mallopt`` may still accept them.

On top of glibc, ``keep_freed_memory`` makes PyTorch's CPU allocator a block cache
(``cache_blocks``, ``csrc/block_cache.cpp``): a tensor's freed storage waits in a list for
the next request of exactly its size, so a step's hundreds of allocations become hash
lookups instead of glibc's searches of its bins for large blocks, which run on the thread the
other threads wait for. Eager training ran 1.038× faster paired (1.027–1.045×) on a Zen 5;
the compiled step did not change by more than its A/Bs resolve (``docs/performance.md``,
item 29). It holds at most ``BLOCK_CACHE_LIMIT`` bytes of freed blocks; a free that would
pass that first gives them all back. ``ALIGNDRAW_BLOCK_CACHE=0`` leaves PyTorch's own
allocator.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import logging
import os
import sys

from aligndraw import extensions

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLDS = (1 << 30, 32 << 20)  # wanted, then the most glibc's manual documents (64-bit)
TRIM_THRESHOLD = 2**31 - 1  # INT_MAX
ENV = "ALIGNDRAW_KEEP_FREED_MEMORY"
NUMPY_ENV = "NUMPY_MADVISE_HUGEPAGE"  # numpy's own switch, read when it is imported
BLOCK_CACHE_ENV = "ALIGNDRAW_BLOCK_CACHE"
BLOCK_CACHE_LIMIT = 2 << 30  # most bytes of freed blocks the block cache keeps


def wanted() -> bool:
    """Whether the environment allows it: ``ALIGNDRAW_KEEP_FREED_MEMORY`` unset or not "0"."""
    return os.environ.get(ENV, "1").strip() != "0"


def wanted_on(device: object) -> bool:
    """Whether a process that runs its model on ``device`` (a ``torch.device`` or its name,
    "cpu", "cuda:0") should keep freed memory: on the CPU, where ``wanted()``. (A GPU's tensors
    come from PyTorch's own caching allocator.)"""
    return str(device).partition(":")[0] == "cpu" and wanted()


@functools.cache
def keep_freed_memory() -> int:
    """Ask the C library to keep freed memory for reuse (once per process). Returns the mmap
    threshold it took, in bytes, or 0 where it took none: off Linux, and where ``mallopt`` is
    missing or refuses (a C library other than glibc; the trim threshold may then be set).
    Where it took one, numpy's huge-page marks are turned off too (``numpy_huge_pages_off``),
    unless ``NUMPY_MADVISE_HUGEPAGE`` is set. Where glibc took the trim threshold, PyTorch's CPU
    allocator also becomes the block cache (``cache_blocks``: built on first use, which takes
    5.5 s once per machine on a Zen 5), unless ``ALIGNDRAW_BLOCK_CACHE=0``."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return 0
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD):
        return 0
    taken = next((size for size in MMAP_THRESHOLDS if mallopt(M_MMAP_THRESHOLD, size)), 0)
    if taken and NUMPY_ENV not in os.environ:  # a user's explicit choice stands
        numpy_huge_pages_off()
    if block_cache_wanted():
        cache_blocks()
    return taken


def block_cache_wanted() -> bool:
    """Whether the environment allows the block cache: ``ALIGNDRAW_BLOCK_CACHE`` unset or not "0"."""
    return os.environ.get(BLOCK_CACHE_ENV, "1").strip() != "0"


def block_cache_missing() -> str | None:
    """Why the block cache cannot be built here (no C++ compiler, no ninja), or None. Cheap."""
    return extensions.missing("the CPU block cache")


@functools.cache
def _load_block_cache() -> str | None:
    """Build (once, cached) and load the block cache's op library; None, or why it could not."""
    return extensions.load_or_why(log, "aligndraw_block_cache", "block_cache.cpp", "the CPU block cache",
                                  "PyTorch's own CPU allocator stays", f"{BLOCK_CACHE_ENV}=0")


def cache_blocks(limit: int = BLOCK_CACHE_LIMIT) -> bool:
    """Make PyTorch's CPU allocator a block cache for the whole process: freed tensor storage
    kept in lists by exact size and handed to the next request of that size, at most ``limit``
    bytes of it (a block over the limit is given back at once; a free that would pass the limit
    first gives every kept block back; a request that finds no memory does too, then tries
    again). Built on first use (5.5 s on a Zen 5; cached by PyTorch's extension builder). Once
    installed it stays; a later call only sets ``limit`` (giving the kept blocks back where they
    exceed it). Returns whether it is PyTorch's CPU allocator now: False where it cannot be
    built (logged) or another allocator of higher priority is registered."""
    if limit < 0:
        raise ValueError(f"cache_blocks: limit must be ≥ 0 bytes, got {limit}")
    if _load_block_cache() is not None:
        return False
    import torch

    return bool(torch.ops.aligndraw_block_cache.install(limit))


def block_cache_stats() -> dict[str, int] | None:
    """The block cache's counts since it was installed, or None where it is not PyTorch's CPU
    allocator: ``hits`` (requests served from the lists), ``misses`` (requests that took a new
    block), ``kept`` (bytes waiting in the lists), ``live`` (bytes of its blocks in use) and
    ``releases`` (times every kept block was given back)."""
    import torch

    if not block_cache_installed():
        return None
    hits, misses, kept, live, releases = torch.ops.aligndraw_block_cache.stats()
    return {"hits": hits, "misses": misses, "kept": kept, "live": live, "releases": releases}


def block_cache_installed() -> bool:
    """Whether the block cache is PyTorch's CPU allocator in this process (builds nothing)."""
    import torch

    return _loaded() and bool(torch.ops.aligndraw_block_cache.installed())


def release_cached_blocks() -> None:
    """Give every block the cache keeps back to the C library (as ``torch.cuda.empty_cache``
    does on a GPU); nothing where the cache is not loaded."""
    import torch

    if _loaded():
        torch.ops.aligndraw_block_cache.release()


def _loaded() -> bool:
    """Whether this process has loaded the block cache's op library (without building it)."""
    import torch

    return hasattr(torch.ops.aligndraw_block_cache, "installed")  # ops namespaces always exist


def numpy_huge_pages_off() -> None:
    """Stop numpy from marking its large arrays for transparent huge pages, where this numpy
    has the switch (``NUMPY_MADVISE_HUGEPAGE=0`` does the same at import).

    numpy marks every array of 4 MiB or more with ``madvise(MADV_HUGEPAGE)``, so that the
    kernel backs it with 2 MiB pages, found (and maybe compacted for) and zeroed when first
    touched. For arrays made and freed batch after batch that can cost more than it gains:
    retrieval in ``aligndraw evaluate`` (arrays of 500 images) ran slower with the marks
    whenever freed memory was kept, and in some runs without (``docs/performance-log.md``,
    item 23). ``keep_freed_memory`` calls it unless ``NUMPY_MADVISE_HUGEPAGE`` is set.
    """
    for name in ("numpy._core.multiarray", "numpy.core.multiarray"):  # numpy 2, numpy 1
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "_set_madvise_hugepage"):
            module._set_madvise_hugepage(False)
            return
