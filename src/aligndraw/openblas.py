"""fp32 matrix products through OpenBLAS, on PyTorch's own threads.

On an AVX2-only AMD EPYC (Zen 3) the OpenBLAS inside numpy's wheels multiplies the model's
fp32 matrices faster than the MKL inside PyTorch's: the plain products of a mnist-captions
training step took 286–331 ms against 349–495 (``ALIGNDRAW_CPU_GEMM=openblas`` or ``aten``
``python benchmarks/products.py``, two alternated rounds; the projection's stacked weight
gradient 39–46 ms against 80–106), and compiled training was 1.09× faster (1.15× paired;
``docs/performance-log.md``, item 18). Calling numpy would run OpenBLAS's own thread pool
beside PyTorch's OpenMP one, and on two cores the two pools' spinning threads starve each
other (the products then took 5–6 times as long). So a small C++ op
(``csrc/openblas_gemm.cpp``, built once with PyTorch's extension builder and cached) splits
each product's output columns over PyTorch's threads, and each thread calls OpenBLAS's
``cblas_sgemm`` on one thread for its block. Same fp32 arithmetic, another summation order.

The ops, once :func:`load` has run (CPU float32 only; a and b row- or column-major, any other
layout is packed first):

* ``torch.ops.aligndraw_openblas.addmm(bias, a, b)``: (N,) or None, (M, K), (K, N) → (M, N);
* ``torch.ops.aligndraw_openblas.mm(a, b)``: (M, K), (K, N) → (M, N);
* ``torch.ops.aligndraw_openblas.tmm(a, b)``: aᵀ b, (R, M), (R, N) → (M, N).

Both trace under ``torch.compile`` (fake kernels below) and run from inductor's C++ wrapper
through PyTorch's dispatcher.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import logging
import os
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "openblas_gemm.cpp"
# cblas_sgemm as OpenBLAS builds name it: numpy's wheels carry a prefixed, 64-bit-integer
# build (scipy-openblas64); a plain build exports cblas_sgemm (32-bit) or cblas_sgemm64_
SGEMM_SYMBOLS = (("scipy_cblas_sgemm64_", True), ("cblas_sgemm64_", True),
                 ("scipy_cblas_sgemm", False), ("cblas_sgemm", False))
THREADS_LOCAL_SYMBOLS = ("openblas_set_num_threads_local", "scipy_openblas_set_num_threads_local64_",
                         "scipy_openblas_set_num_threads_local")


def numpy_openblas() -> Path | None:
    """The OpenBLAS library that numpy's wheel carries (``numpy.libs/`` beside numpy on Linux),
    or that this process has loaded; None if neither is found (numpy built with another BLAS)."""
    import numpy

    here = Path(numpy.__file__).resolve().parent
    for pattern in ("../numpy.libs/*openblas*", ".dylibs/*openblas*", "../numpy.libs/*openblas*.dll"):
        found = sorted(glob.glob(str(here / pattern)))
        if found:
            return Path(found[0]).resolve()
    try:  # Linux: what the process mapped (e.g. a numpy linked to the system's OpenBLAS)
        maps = Path("/proc/self/maps").read_text().split("\n")
    except OSError:
        return None
    paths = {line.split()[-1] for line in maps if "openblas" in line.rsplit("/", 1)[-1].lower()}
    return Path(sorted(paths)[0]) if paths else None


def _symbols(library: Path) -> tuple[int, bool, int]:
    """(sgemm address, 64-bit integers, set-threads-local address or 0) from ``library``."""
    lib = ctypes.CDLL(str(library))
    sgemm = next(((getattr(lib, name), ilp64) for name, ilp64 in SGEMM_SYMBOLS
                  if hasattr(lib, name)), None)
    if sgemm is None:
        raise RuntimeError(f"{library} exports no cblas_sgemm (looked for "
                           f"{', '.join(name for name, _ in SGEMM_SYMBOLS)})")
    local = next((getattr(lib, name) for name in THREADS_LOCAL_SYMBOLS if hasattr(lib, name)), None)
    if local is None:
        raise RuntimeError(f"{library} exports no openblas_set_num_threads_local (OpenBLAS "
                           "0.3.27 or later has it): without it OpenBLAS's own threads would "
                           "run beside PyTorch's")
    address = ctypes.cast(sgemm[0], ctypes.c_void_p).value
    return address, sgemm[1], ctypes.cast(local, ctypes.c_void_p).value


def missing() -> str | None:
    """Why the OpenBLAS products cannot be built here (no OpenBLAS in numpy, no C++ compiler,
    no ninja), or None. Cheap: builds nothing."""
    if numpy_openblas() is None:
        return "numpy carries no OpenBLAS here (numpy built with another BLAS)"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None and shutil.which("g++") is None:
        return f"no C++ compiler ({compiler} or g++) to build the OpenBLAS product op"
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        return "no ninja to build the OpenBLAS product op (pip install ninja)"
    return None


_loaded = False  # a plain flag: ``torch.compile`` traces reading it (not a cache's statistics)


@functools.cache
def load() -> None:
    """Build (once, cached by PyTorch's extension builder) and load the op, bind it to numpy's
    OpenBLAS, and register its fake kernels. Raises RuntimeError saying what is missing."""
    why = missing()
    if why:
        raise RuntimeError(why)
    from torch.utils.cpp_extension import load as build

    log.info("loading the OpenBLAS product op (built once, about half a minute)")
    build(name="aligndraw_openblas", sources=[str(SOURCE)], is_python_module=False,
          extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"])
    address, ilp64, local = _symbols(numpy_openblas())
    torch.ops.aligndraw_openblas.bind(address, ilp64, local)

    @torch.library.register_fake("aligndraw_openblas::addmm")
    def _(bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a.new_empty((a.shape[0], b.shape[1]))

    @torch.library.register_fake("aligndraw_openblas::mm")
    def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a.new_empty((a.shape[0], b.shape[1]))

    @torch.library.register_fake("aligndraw_openblas::tmm")
    def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a.new_empty((a.shape[1], b.shape[1]))

    global _loaded
    _loaded = True


def loaded() -> bool:
    """Whether :func:`load` has run successfully in this process."""
    return _loaded


def addmm(bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (+ bias): (M, K), (K, N), (N,) → (M, N), through OpenBLAS (after :func:`load`)."""
    return torch.ops.aligndraw_openblas.addmm(bias, a, b)


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b: (M, K), (K, N) → (M, N), through OpenBLAS (after :func:`load`)."""
    return torch.ops.aligndraw_openblas.mm(a, b)


def tmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """aᵀ @ b: (R, M), (R, N) → (M, N), through OpenBLAS (after :func:`load`)."""
    return torch.ops.aligndraw_openblas.tmm(a, b)
