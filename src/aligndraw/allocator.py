"""Keep freed memory in the process: glibc malloc settings for training and sampling on the CPU.

A training step allocates and frees the same tensors every step (a 3.9 MB weight gradient per
drawing step, 1.3 MB projections, the backward's buffers). glibc serves blocks above its mmap
threshold with fresh pages and gives freed heap memory back to the system, so each step pays
page faults again on memory it just released: measured, the compiled mnist-captions training
step took 277 ms as is and 239 ms with freed memory kept (``docs/performance.md``). These are
the settings of glibc's ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` and
``MALLOC_TOP_PAD_``, applied from inside the process with ``mallopt``: a process holding a
few hundred MB more than it needs at its peak, in exchange for no page faults in the loop.

The command-line entry points and the benchmarks call ``keep_freed_memory`` at start (the
naive reference in the benchmark shares the process, so it is measured with the same
allocator); library users may call it themselves. ``ALIGNDRAW_MALLOC=default`` skips it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc malloc.h
MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks below this come from the heap
TRIM_THRESHOLD = 1 << 30  # give memory back only when 1 GiB is free at the heap's top
TOP_PAD = 256 << 20  # grow the heap in steps this large

_applied = False


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory (see the module docstring); idempotent.

    Returns whether the settings are in effect: False off Linux/glibc or with
    ``ALIGNDRAW_MALLOC=default`` in the environment.
    """
    global _applied
    if _applied:
        return True
    if os.environ.get("ALIGNDRAW_MALLOC", "").strip().lower() == "default":
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                (_M_TOP_PAD, TOP_PAD))
    _applied = all(mallopt(option, value) == 1 for option, value in settings)
    return _applied
