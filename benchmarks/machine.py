"""Measuring the machine: wall and CPU time of a call, matmul peak, other processes' load.

Used by ``throughput.py``. On a shared machine read the figures with ``OtherLoad``: with several
threads every parallel op waits for any descheduled thread, so a second busy process can
inflate multi-threaded wall times many-fold while single-threaded runs only lose their share.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext

import torch

from aligndraw import gemm

# Environment variables that choose which CPU kernels run, read once: as a library loads, or
# (inductor) at its first compile. The library's product backends (plain and batched),
# PyTorch's and inductor's vector width, MKL's, OpenBLAS's and oneDNN's instruction sets.
# ``ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 OPENBLAS_CORETYPE=Haswell`` runs an
# AVX-512 machine's step with AVX2 kernels in PyTorch, inductor, MKL and OpenBLAS (oneDNN too
# with ONEDNN_MAX_CPU_ISA=AVX2; the C library keeps its own): docs/performance-log.md, "An AVX2 proxy".
KERNEL_ENV = ("ALIGNDRAW_CPU_GEMM", "ALIGNDRAW_CPU_BMM", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS",
              "OPENBLAS_CORETYPE", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


def kernel_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ``KERNEL_ENV`` variables set in ``environ`` (default this process's), by name."""
    environ = os.environ if environ is None else environ
    return {k: environ[k] for k in KERNEL_ENV if environ.get(k, "").strip()}


def keep_freed_memory(flag: str, asked: bool = True) -> int:
    """``aligndraw.allocator.keep_freed_memory()`` for a benchmark asked to by ``flag``: the
    mmap threshold glibc took, in bytes; exits, naming the flag, where the C library refuses.
    Does nothing and returns 0 where not ``asked``."""
    from aligndraw import allocator

    if not asked:
        return 0
    taken = allocator.keep_freed_memory()
    if not taken:
        raise SystemExit(f"{flag}: this C library refused aligndraw.allocator's settings")
    return taken


def kept_note(taken: int, sep: str = "") -> str:
    """``sep`` + "freed memory kept (mmap threshold N MiB)" for a threshold ``keep_freed_memory``
    took, with ", blocks cached by size" where the block cache is PyTorch's CPU allocator in
    this process; "" for 0 (not kept)."""
    from aligndraw import allocator

    if not taken:
        return ""
    cached = ", blocks cached by size" if allocator.block_cache_installed() else ""
    return f"{sep}freed memory kept (mmap threshold {taken >> 20} MiB{cached})"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def _busy_cpu_seconds() -> float | None:
    """Whole-machine busy CPU seconds so far (Linux /proc/stat), or None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux /proc), 0 where unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


# A timing run is "busy" when other processes kept more than this many cores busy on average.
BUSY_CORES = 0.25


class OtherLoad:
    """Average number of cores that *other* processes kept busy while this block ran.

    ``own_pids``: processes that work for this one (data-parallel workers), not counted.
    """

    def __init__(self, own_pids: list[int] | tuple[int, ...] = ()) -> None:
        self.own_pids = tuple(own_pids)

    def _own(self) -> float:
        return time.process_time() + sum(_process_cpu_seconds(pid) for pid in self.own_pids)

    def __enter__(self) -> OtherLoad:
        self.busy, self.own, self.wall = _busy_cpu_seconds(), self._own(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        busy = _busy_cpu_seconds()
        wall = time.perf_counter() - self.wall
        self.cores = (None if busy is None or self.busy is None
                      else max(0.0, (busy - self.busy - (self._own() - self.own)) / wall))


def matmul_peak(dtype: torch.dtype, size: int, device: torch.device, repeats: int = 7,
                gemm_backend: str | None = None) -> float:
    """Median GFLOP/s of a square (size × size) @ (size × size) product.

    ``gemm_backend``: None for PyTorch's ``@``, else the product of ``aligndraw.gemm`` with that
    backend (``"onednn"``: the kernels the library uses for CPU fp32)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)

    def product() -> None:
        if gemm_backend is None:
            a @ b
        else:
            gemm.addmm_t(a, b)

    with gemm.using(gemm_backend) if gemm_backend else nullcontext():
        for _ in range(2):
            product()
        times = [timed(product, device) for _ in range(repeats)]
    return 2 * size**3 / statistics.median(times) / 1e9


def timed_cpu(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one call."""
    cpu = time.process_time()
    wall = timed(fn, device)
    return wall, time.process_time() - cpu
