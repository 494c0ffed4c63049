"""Keeping freed memory: glibc's allocator settings for a CPU training process.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves a block above its
mmap threshold (128 KiB at first, raised as blocks are freed, at most 32 MiB) with fresh pages
from the kernel and returns them when the block is freed, and it gives freed heap memory back
once more than twice that threshold is free at the top. A training step frees and takes back
the same buffers every step, so they are page-faulted afresh each time: an eager training
step of mnist-captions took 21,687 page faults, coco32's 64,348, and a zeroed coco32
embedding gradient (25,325 × 512 floats, 52 MB) 12,663 and 9.9–12.1 ms against none and
3.0–3.2 ms from kept memory (``benchmarks/freed_memory.py``, an Intel Xeon). Kept, eager training was 1.093×
faster on mnist-captions and 1.086× on coco32 by medians, compiled training 1.036× on coco32
and unchanged on mnist-captions; sampling unchanged (``docs/performance.md``, item 20).

``keep_freed_memory`` raises both thresholds for the process, so that freed blocks up to
1 GiB stay in the heap for the next step. The cost: the process keeps its peak memory rather
than returning it to the system between steps. The trainer calls it on the CPU unless
``ALIGNDRAW_KEEP_FREED_MEMORY=0``.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GiB come from the heap
TRIM_THRESHOLD = 2**31 - 1  # the largest int: the heap's top is never given back
ENV = "ALIGNDRAW_KEEP_FREED_MEMORY"


def wanted() -> bool:
    """Whether the environment allows it: ``ALIGNDRAW_KEEP_FREED_MEMORY`` unset or not "0"."""
    return os.environ.get(ENV, "1").strip() != "0"


@functools.cache
def keep_freed_memory() -> bool:
    """Ask the C library to keep freed memory for reuse (once per process). Returns whether
    it took both settings: False off Linux, and where ``mallopt`` is missing or refuses them
    (a C library other than glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
