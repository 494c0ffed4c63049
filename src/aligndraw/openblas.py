"""fp32 matrix products through OpenBLAS, on PyTorch's own threads.

On an AVX2-only AMD EPYC (Zen 3) the OpenBLAS inside numpy's wheels multiplies the model's
fp32 matrices faster than the MKL inside PyTorch's: the plain products of a mnist-captions
training step took 286–331 ms against 349–495 (``ALIGNDRAW_CPU_GEMM=openblas`` or ``aten``
``python benchmarks/products.py``, two alternated rounds; the projection's stacked weight
gradient 39–46 ms against 80–106), and compiled training was 1.09× faster (1.15× paired;
``docs/performance-log.md``, item 18). Calling numpy would run OpenBLAS's own thread pool
beside PyTorch's OpenMP one, and on two cores the two pools' spinning threads starve each
other (the plain products of a step then took 2970–3028 ms against MKL's 515–546). So a small C++ op
(``csrc/openblas_gemm.cpp``, built once with PyTorch's extension builder and cached) splits
each product's output over PyTorch's threads, and each thread calls OpenBLAS's ``cblas_sgemm``
for its block. It splits the longer side, rows for an (M, N) output with M > N, else columns:
each thread's sgemm packs all of the operand that is not split, so a weight gradient aᵀb
(M = 3286 rows against N = 300 columns in mnist-captions) does not pack its (M, R) side once
per thread. Same fp32 arithmetic, another summation order.

:func:`load` sets numpy's OpenBLAS to one thread for the whole process (OpenBLAS's thread
count is global: numpy's build has no per-thread setting), so numpy's own matrix products in
a process that loaded the op run on one thread; PyTorch's threads do the parallel work.

The ops, once :func:`load` has run (CPU float32 only; a and b row- or column-major, any other
layout is packed first):

* ``torch.ops.aligndraw_openblas.addmm(bias, a, b)``: (N,) or None, (M, K), (K, N) → (M, N);
* ``torch.ops.aligndraw_openblas.mm(a, b)``: (M, K), (K, N) → (M, N);
* ``torch.ops.aligndraw_openblas.tmm(a, b)``: aᵀ b, (R, M), (R, N) → (M, N);
* ``torch.ops.aligndraw_openblas.bmm(a, b)``: (P, M, K), (P, K, N) → (P, M, N), the P products
  split over PyTorch's threads (each matrix row- or column-major, any batch stride);
* ``torch.ops.aligndraw_openblas.baddbmm(c, a, b)``: c + a @ b, (P, M, N), (P, M, K), (P, K, N).

All five trace under ``torch.compile`` (fake kernels below) and run from inductor's C++ wrapper
through PyTorch's dispatcher.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import logging
from pathlib import Path

import torch

from aligndraw import extensions

log = logging.getLogger(__name__)

SOURCE = extensions.CSRC / "openblas_gemm.cpp"
# cblas_sgemm as OpenBLAS builds name it: numpy's wheels carry a prefixed, 64-bit-integer
# build (scipy-openblas64); a plain build exports cblas_sgemm (32-bit) or cblas_sgemm64_
SGEMM_SYMBOLS = (("scipy_cblas_sgemm64_", True), ("cblas_sgemm64_", True),
                 ("scipy_cblas_sgemm", False), ("cblas_sgemm", False))
SET_THREADS_SYMBOLS = ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_",
                       "scipy_openblas_set_num_threads", "openblas_set_num_threads")
GET_THREADS_SYMBOLS = ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_",
                       "scipy_openblas_get_num_threads", "openblas_get_num_threads")
CORENAME_SYMBOLS = ("scipy_openblas_get_corename64_", "openblas_get_corename64_",
                    "scipy_openblas_get_corename", "openblas_get_corename")
# OpenBLAS's x86 kernels with AVX-512, by the names openblas_get_corename gives them, lower case
AVX512_CORES = frozenset({"skylakex", "cooperlake", "sapphirerapids"})


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


def _function(lib: ctypes.CDLL, names: tuple[str, ...], what: str) -> ctypes._CFuncPtr:
    function = next((getattr(lib, name) for name in names if hasattr(lib, name)), None)
    if function is None:
        raise RuntimeError(f"{lib._name} exports no {what} (looked for {', '.join(names)})")
    return function


def _symbols(library: Path) -> tuple[int, bool]:
    """(cblas_sgemm's address, whether it takes 64-bit integers) in ``library``."""
    lib = ctypes.CDLL(str(library))
    sgemm = _function(lib, tuple(name for name, _ in SGEMM_SYMBOLS), "cblas_sgemm")
    ilp64 = dict(SGEMM_SYMBOLS)[sgemm.__name__]
    return ctypes.cast(sgemm, ctypes.c_void_p).value, ilp64


def threads(library: Path | None = None) -> int:
    """How many threads ``library`` (default numpy's OpenBLAS) uses for a product."""
    lib = ctypes.CDLL(str(library or numpy_openblas()))
    get = _function(lib, GET_THREADS_SYMBOLS, "openblas_get_num_threads")
    get.restype = ctypes.c_int
    return get()


def corename(library: Path | None = None) -> str | None:
    """The kernels OpenBLAS runs in this process, by its own name (``"SkylakeX"``,
    ``"Haswell"``, ``"Zen"``, …): chosen when the library loaded, by the CPU or by the
    environment's ``OPENBLAS_CORETYPE``. None if there is no OpenBLAS or it cannot say."""
    library = library or numpy_openblas()
    if library is None:
        return None
    try:
        get = _function(ctypes.CDLL(str(library)), CORENAME_SYMBOLS, "openblas_get_corename")
    except (OSError, RuntimeError):  # not loadable, or a build without the function
        return None
    get.restype = ctypes.c_char_p
    name = get()
    return name.decode(errors="replace") if name else None


def narrowed_core_warning(core: str | None, forced: str | None, flags: frozenset[str]) -> str | None:
    """A message if ``OPENBLAS_CORETYPE`` (``forced``; None when unset) is set and OpenBLAS runs
    kernels without AVX-512 (``core``, :func:`corename`; None: unknown, no message) on a CPU
    that has it (``flags``, ``gemm.cpu_flags()``); else None.

    On an AMD EPYC Zen 5 whose environment set ``OPENBLAS_CORETYPE=Haswell``, the batched
    products of a mnist-captions training step, each timed alone, took 33.3 ms with those
    kernels against 16.0 with ``OPENBLAS_CORETYPE=SkylakeX`` (the kernels OpenBLAS picks there
    when the variable is unset), and compiled training ran 1.07× faster by medians (1.09×
    paired) with SkylakeX (docs/performance-log.md, item 28)."""
    if not forced or core is None or "avx512f" not in flags or core.lower() in AVX512_CORES:
        return None
    return (f"OpenBLAS runs its {core} kernels, without AVX-512, on this CPU, which has it, and "
            f"OPENBLAS_CORETYPE={forced} is set (OpenBLAS takes its kernels from it when it "
            "loads): the batched products ran about half as fast as with SkylakeX kernels on "
            "an AMD EPYC Zen 5 (docs/performance-log.md, item 28); unless you mean it, unset "
            "OPENBLAS_CORETYPE before the process starts")


def _one_thread(library: Path) -> None:
    """Set ``library`` to one thread, for the process: the op's threads are PyTorch's."""
    lib = ctypes.CDLL(str(library))
    _function(lib, SET_THREADS_SYMBOLS, "openblas_set_num_threads")(ctypes.c_int(1))


def missing() -> str | None:
    """Why the OpenBLAS products cannot be built here (no OpenBLAS in numpy, no C++ compiler,
    no ninja), or None. Cheap: builds nothing."""
    if numpy_openblas() is None:
        return "numpy carries no OpenBLAS here (numpy built with another BLAS)"
    return extensions.missing("the OpenBLAS product op")


_loaded = False  # a plain flag: ``torch.compile`` traces reading it (not a cache's statistics)


@functools.cache
def load() -> None:
    """Build (once, cached by PyTorch's extension builder) and load the op, bind it to numpy's
    OpenBLAS (set to one thread for the process), and register its fake kernels. Raises
    RuntimeError saying what is missing."""
    why = missing()
    if why:
        raise RuntimeError(why)
    log.info("loading the OpenBLAS product op (built once, about half a minute)")
    extensions.build("aligndraw_openblas", SOURCE.name, openmp=True)
    library = numpy_openblas()
    address, ilp64 = _symbols(library)
    _one_thread(library)
    log.info("numpy's OpenBLAS (%s) set to one thread: its products run on PyTorch's threads",
             library.name)
    torch.ops.aligndraw_openblas.bind(address, ilp64)

    @torch.library.register_fake("aligndraw_openblas::addmm")
    def _(bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a.new_empty((a.shape[0], b.shape[1]))

    @torch.library.register_fake("aligndraw_openblas::mm")
    def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a.new_empty((a.shape[0], b.shape[1]))

    @torch.library.register_fake("aligndraw_openblas::tmm")
    def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a.new_empty((a.shape[1], b.shape[1]))

    @torch.library.register_fake("aligndraw_openblas::bmm")
    def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a.new_empty((a.shape[0], a.shape[1], b.shape[2]))

    @torch.library.register_fake("aligndraw_openblas::baddbmm")
    def _(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a.new_empty((a.shape[0], a.shape[1], b.shape[2]))

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


def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b per matrix: (P, M, K), (P, K, N) → (P, M, N), through OpenBLAS (after :func:`load`)."""
    return torch.ops.aligndraw_openblas.bmm(a, b)


def baddbmm(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """c + a @ b per matrix: (P, M, N), (P, M, K), (P, K, N) → (P, M, N), through OpenBLAS
    (after :func:`load`)."""
    return torch.ops.aligndraw_openblas.baddbmm(c, a, b)
