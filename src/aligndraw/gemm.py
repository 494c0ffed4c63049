"""fp32 matrix products on the CPU through the fastest library the machine has.

PyTorch's CPU build multiplies fp32 matrices with MKL. Two other libraries beat it on some
processors, with the same fp32 arithmetic in another summation order (results agree with
``F.linear`` to fp32 rounding; tests check 1e-5 relative):

* **oneDNN** (inside every PyTorch CPU build, and what PyTorch already uses for bf16) picks its
  kernels by instruction set. On AMD processors MKL runs its AVX2 kernels, half the width of
  the AVX-512 units the machine has: on an AMD EPYC (Zen 5) oneDNN multiplies fp32 matrices
  about 2.2× faster (``python benchmarks/gemm.py``).
* **OpenBLAS** (the copy inside numpy's wheels, run on PyTorch's threads; ``aligndraw.openblas``)
  on AMD processors without AVX-512: on an AMD EPYC (Zen 3) compiled training 1.09× faster
  than with MKL (1.15× paired), where oneDNN was slower than MKL (MKL's fp32 peak 1.2–1.4×
  oneDNN's; compiled training 1.069× faster with MKL).

On Intel processors MKL runs its own AVX-512 kernels and was as fast as oneDNN or faster at
every one of the model's shapes (an Intel Xeon with AMX, 2026-12-02: ``benchmarks/gemm.py``),
so there the default stays MKL (``aten``), as it does on other processors.

The backend is chosen once per process: ``ALIGNDRAW_CPU_GEMM=onednn|openblas|aten`` in the
environment, or ``set_backend``; the default is oneDNN on non-Intel processors with AVX-512
where PyTorch has it, OpenBLAS on AMD processors with AVX2 and without AVX-512 where it can be
built (numpy's OpenBLAS, a C++ compiler and ninja: ``openblas.missing()``; built on first use,
and if that fails the default falls back to ``aten`` with a warning), else ``aten``. Only CPU
fp32 products with both sides of the weight at least ``MIN_SIZE`` go through oneDNN or
OpenBLAS (on small outputs their calls cost more than MKL's); everything else (GPU, bf16 and
autocast, small heads) is plain PyTorch.

The step's **batched** products (``bmm`` and ``baddbmm``: the filterbanks' products and the
context mix's gradients) have a backend of their own, applied under ``torch.compile`` by
``aligndraw.compiler``'s last graph pass: ``ALIGNDRAW_CPU_BMM=openblas|aten`` or
``set_batched_backend``; the default is OpenBLAS on AMD processors with AVX-512 where its op
can be built (there MKL's ``bmm`` runs AVX2 kernels, as far as its speed shows; OpenBLAS's
op trained 1.05× faster compiled on an AMD EPYC Zen 4), else ``aten`` (on an AVX2-only Zen 3
eager training ran 0.945× as fast with OpenBLAS's op). Eagerly the filterbanks' products,
the caption encoder's recurrent product and the context mix's stacked gradient take the same
backend through ``matmul``, ``bmm`` and ``baddbmm`` here (forward and both gradients); the
first such product loads OpenBLAS's op. OpenBLAS picks its kernels when it loads; where the
environment's ``OPENBLAS_CORETYPE`` holds it to kernels without AVX-512 on a processor with
AVX-512, the first load logs a warning (``openblas.narrowed_core_warning``).
"""

from __future__ import annotations

import logging
import os
import platform
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from aligndraw import openblas

log = logging.getLogger(__name__)

BACKENDS = ("onednn", "openblas", "aten")
MIN_SIZE = 64  # weights with a side smaller than this stay with the default BLAS


def cpu_vendor() -> str:
    """The CPU's vendor id (``"GenuineIntel"``, ``"AuthenticAMD"``, …), or ``""`` if unknown."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == "vendor_id":
                    return value.strip()
        return ""  # Linux without a vendor id (e.g. ARM)
    except OSError:
        pass
    # no /proc (Windows): e.g. "Intel64 Family 6 Model 143 Stepping 8, GenuineIntel"
    vendor = platform.processor().rpartition(",")[2].strip()
    return vendor if vendor in ("GenuineIntel", "AuthenticAMD") else ""


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``avx2``, ``avx512f``, …) from /proc/cpuinfo; empty if unknown."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == "flags":
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def _default_backend(vendor: str | None = None, flags: frozenset[str] | None = None) -> str:
    """``ALIGNDRAW_CPU_GEMM`` if set; else, by ``vendor`` and ``flags`` (default this CPU's):
    oneDNN on a non-Intel CPU with AVX-512 where PyTorch has it; OpenBLAS on an AMD CPU with
    AVX2 and without AVX-512 where it can be built (``openblas.missing()``); ``aten`` otherwise.

    Without AVX-512 oneDNN has no wider kernels than MKL's AVX2 ones, and on an AVX2-only AMD
    EPYC (Zen 3) MKL was the faster of the two (compiled training 1.069×), OpenBLAS faster
    than both (docs/performance-log.md, items 1 and 18)."""
    name = os.environ.get("ALIGNDRAW_CPU_GEMM", "").strip().lower()
    if name:
        return _checked(name)
    vendor = cpu_vendor() if vendor is None else vendor
    flags = cpu_flags() if flags is None else flags
    if vendor == "GenuineIntel":
        return "aten"
    if "avx512f" in flags:
        return "onednn" if torch.backends.mkldnn.is_available() else "aten"
    if vendor == "AuthenticAMD" and "avx2" in flags and openblas.missing() is None:
        return "openblas"
    return "aten"


def _checked(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"CPU GEMM backend must be one of {', '.join(BACKENDS)} (from "
                         f"set_backend or ALIGNDRAW_CPU_GEMM), got {name!r}")
    if name == "onednn" and not torch.backends.mkldnn.is_available():
        raise ValueError("CPU GEMM backend 'onednn' asked for, but this PyTorch build has no "
                         "oneDNN (torch.backends.mkldnn.is_available() is False); use 'aten'")
    if name == "openblas" and not openblas.loaded() and (why := openblas.missing()):
        raise ValueError(f"CPU GEMM backend 'openblas' asked for, but {why}; use 'aten'")
    return name


def _default_batched_backend(vendor: str | None = None, flags: frozenset[str] | None = None) -> str:
    """``ALIGNDRAW_CPU_BMM`` if set; else, by ``vendor`` and ``flags`` (default this CPU's):
    OpenBLAS on an AMD CPU with AVX-512 where its op can be built (``openblas.missing()``),
    ``aten`` (PyTorch's ``bmm``: MKL) otherwise.

    The step's batched products are small (the filterbanks' 8×60·60×60 and smaller, the context
    mix's 1×12·12×1200). On an AMD processor MKL runs them with its AVX2 kernels; on an AMD
    EPYC (Zen 4) OpenBLAS's kernels, one matrix per call on each thread, ran the batched
    products of a mnist-captions training step's schedule (each timed alone, also some the
    compiled model leaves to inductor) in 24.4 ms against MKL's 59.3 (``benchmarks/products.py``;
    docs/performance-log.md, item 26). On an AVX2-only AMD EPYC (Zen 3) eager training ran
    0.945× as fast with OpenBLAS's (the autograd nodes of item 33 included) and compiled
    training was alike (1.007×, not resolved): item 34. AVX-512 is what separates the AMD
    processors measured, not a shown cause."""
    name = os.environ.get("ALIGNDRAW_CPU_BMM", "").strip().lower()
    if name:
        return _checked_batched(name)
    vendor = cpu_vendor() if vendor is None else vendor
    flags = cpu_flags() if flags is None else flags
    amd_avx512 = vendor == "AuthenticAMD" and "avx512f" in flags
    return "openblas" if amd_avx512 and openblas.missing() is None else "aten"


def _checked_batched(name: str) -> str:
    if name not in BATCHED_BACKENDS:
        raise ValueError(f"CPU batched-product backend must be one of {', '.join(BATCHED_BACKENDS)} "
                         f"(from set_batched_backend or ALIGNDRAW_CPU_BMM), got {name!r}")
    if name == "openblas" and not openblas.loaded() and (why := openblas.missing()):
        raise ValueError(f"CPU batched-product backend 'openblas' asked for, but {why}; use 'aten'")
    return name


BATCHED_BACKENDS = ("openblas", "aten")
_backend = _default_backend()
_batched = _default_batched_backend()
# whether the backend was asked for (ALIGNDRAW_CPU_GEMM, set_backend): then a failure to build
# OpenBLAS's op is an error; chosen by default, it falls back to aten with a warning
_asked = bool(os.environ.get("ALIGNDRAW_CPU_GEMM", "").strip())
_batched_asked = bool(os.environ.get("ALIGNDRAW_CPU_BMM", "").strip())
# whether compiled batched products form tall results transposed (``transposes_tall_products``)
_tall_transposed = cpu_vendor() == "AuthenticAMD"
_PREPARING = threading.Lock()


def prepare() -> str:
    """Load what the backend needs (OpenBLAS's op: built on first use, then cached) and return
    the backend. ``aligndraw.compiler.compile`` calls it before tracing; eager products call it
    at their first use. Chosen by default, a backend that fails to load falls back to ``aten``
    with a warning; asked for, the failure is raised."""
    with _PREPARING:  # one load, where products first run on several threads (the server)
        _prepare_locked()
    return _backend


def _prepare_locked() -> None:
    global _backend, _batched
    if "openblas" in (_backend, _batched) and not openblas.loaded():
        try:
            _load_openblas()
        except Exception as e:
            if _asked and _backend == "openblas":
                raise RuntimeError(f"CPU GEMM backend 'openblas': {e}") from e
            if _batched_asked and _batched == "openblas":
                raise RuntimeError(f"CPU batched-product backend 'openblas': {e}") from e
            log.warning("OpenBLAS products unavailable (%s); PyTorch's products instead", e)
            _backend = "aten" if _backend == "openblas" else _backend
            _batched = "aten"


def _load_openblas() -> None:
    """``openblas.load()``, called where OpenBLAS is not loaded yet, then a warning if the
    environment narrowed its kernels (``openblas.narrowed_core_warning``)."""
    openblas.load()
    if why := openblas.narrowed_core_warning(openblas.corename(), os.environ.get("OPENBLAS_CORETYPE"),
                                             cpu_flags()):
        log.warning(why)


def cpu_bf16_native() -> bool:
    """Whether this CPU multiplies bf16 matrices with oneDNN's vector kernels (AVX-512 or
    AMX on x86, bf16 instructions on ARM). Without them (e.g. an AVX2-only processor) PyTorch
    multiplies bf16 with a scalar fallback: on an AVX2-only AMD EPYC (Zen 3), 0.28 GFLOP/s
    against 115–139 for fp32 (``benchmarks/throughput.py``'s peaks), so bf16 autocast is
    hundreds of times slower there."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def bf16_warning(device: torch.device | str) -> str | None:
    """A message saying why bf16 autocast on ``device`` would be slow, or None if it is not
    (any non-CPU device, or a CPU with native bf16 products)."""
    if torch.device(device).type != "cpu" or cpu_bf16_native():
        return None
    return ("bf16 autocast asked for, but this CPU has no native bf16 matrix products "
            "(oneDNN needs AVX-512 or AMX on x86): PyTorch multiplies bf16 here with a scalar "
            "fallback, hundreds of times slower than fp32; use precision fp32 on this machine")


def backend() -> str:
    """The CPU fp32 GEMM backend in use: ``"onednn"``, ``"openblas"`` or ``"aten"`` (PyTorch's
    default BLAS). A default ``"openblas"`` that fails to load at first use becomes ``"aten"``."""
    return _backend


def batched_backend() -> str:
    """The CPU fp32 batched-product backend (``bmm``, ``baddbmm``: eagerly through ``matmul``
    and ``baddbmm`` here, under ``torch.compile`` through ``aligndraw.compiler``'s pass):
    ``"openblas"`` or ``"aten"``. A default ``"openblas"`` that fails to load becomes ``"aten"``."""
    return _batched


def transposes_tall_products() -> bool:
    """Whether ``aligndraw.compiler``'s pass forms CPU fp32 batched products whose matrices come
    out taller than wide as transposed wide ones (``tall_bmm``): where they are PyTorch's (MKL's)
    on an AMD processor.

    MKL's AVX2 kernels run a product with few output columns slowly: on an AMD EPYC (Zen 3) the
    write's filterbank gradient dC F̂ᵀ, 100 × (60×60)·(60×8), took 4.81–5.45 ms over a training
    step's 32 drawing steps against 2.38–2.44 as (F̂ dCᵀ)ᵀ, and the reads' 200 × (60×8)·(8×8)
    3.19–3.22 ms against 1.19–1.22 (docs/performance-log.md, item 36; on an AMD EPYC Zen 4,
    MKL's tall 100 × (60×60)·(60×8) took 6.41 ms against 1.88 for 100 × (8×60)·(60×60),
    ``docs/benchmarks/products-batched-aten-zen4.txt``). Only compiled: eagerly the Python
    autograd node that would transpose them cost more than it saved. OpenBLAS's batched op runs
    the tall form as fast as the wide one or faster, and MKL's Intel kernels were not measured,
    so neither changes."""
    return _batched == "aten" and _tall_transposed


def _chosen(kind: str, name: str) -> str:
    """Make ``name`` (checked) the ``kind`` backend ("plain" or "batched"), asked for; return
    the old one. OpenBLAS's op is loaded first: a failure is raised, nothing changed."""
    if name == "openblas" and not openblas.loaded():
        _load_openblas()
    backend_var, asked_var = _STATE[kind]
    old = globals()[backend_var]
    globals().update({backend_var: name, asked_var: True})
    return old


@contextmanager
def _restored(kind: str) -> Iterator[None]:
    """After the block, the ``kind`` backend as it was before it (chosen by default or asked
    for; loaded or not)."""
    saved = {var: globals()[var] for var in _STATE[kind]}
    try:
        yield
    finally:
        globals().update(saved)


# each kind of product's backend and whether it was asked for, by their module variables
_STATE = {"plain": ("_backend", "_asked"), "batched": ("_batched", "_batched_asked")}


def set_backend(name: str) -> str:
    """Use ``name`` (one of ``BACKENDS``) for CPU fp32 products from now on; returns the old one.
    OpenBLAS's op is loaded here (built on first use): a failure is raised, nothing changed."""
    return _chosen("plain", _checked(name))


def set_batched_backend(name: str) -> str:
    """Use ``name`` (one of ``BATCHED_BACKENDS``) for CPU fp32 batched products, eager and
    compiled, from now on; returns the old one. OpenBLAS's op is loaded here (built on first use)."""
    return _chosen("batched", _checked_batched(name))


@contextmanager
def using(name: str) -> Iterator[None]:
    """Within the block, CPU fp32 products use backend ``name``; after it, the previous backend,
    as it was (chosen by default or asked for; loaded or not)."""
    with _restored("plain"):
        set_backend(name)
        yield


@contextmanager
def using_batched(name: str) -> Iterator[None]:
    """Within the block, CPU fp32 batched products (eager, and compiled within it) use backend
    ``name``; after it, the previous one, as it was."""
    with _restored("batched"):
        set_batched_backend(name)
        yield


def _ready() -> bool:
    """A backend other than ``aten`` is chosen and loaded. Eagerly OpenBLAS's op is loaded here
    at the first product; while tracing it cannot be (``compiler.compile`` loads it first), and
    a trace that finds it unloaded uses plain PyTorch."""
    if _backend == "aten":
        return False
    if _backend == "openblas" and not openblas.loaded():
        return not torch.compiler.is_compiling() and prepare() == "openblas"
    return True


def _cpu_fp32(*tensors: Tensor) -> bool:
    """No autocast, and every tensor fp32 on the CPU: what either backend multiplies."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and not torch.is_autocast_enabled("cpu"))


def _eligible(*tensors: Tensor) -> bool:
    """oneDNN or OpenBLAS chosen, no autocast, and every tensor fp32 on the CPU (sizes aside)."""
    return _cpu_fp32(*tensors) and _ready()


def _large(weight: Tensor) -> bool:
    """A matrix with both sides at least ``MIN_SIZE`` (smaller ones stay with the default BLAS)."""
    return weight.dim() == 2 and min(weight.shape) >= MIN_SIZE


def uses_backend(x: Tensor, weight: Tensor) -> bool:
    """Whether ``x @ weight.T`` goes through oneDNN or OpenBLAS (whichever is the backend):
    CPU, fp32, no autocast, a large weight."""
    return (_large(weight) and x.dim() >= 2 and x.numel() > 0
            and _eligible(x, weight))  # a single vector or an empty batch: plain


# needs_exact_strides (the default for custom ops, named so that inductor keeps it also under
# ``aligndraw.compiler``'s lowering of the op): the operands keep their traced, dense strides
@torch.library.custom_op("aligndraw::onednn_linear", mutates_args=(),
                         tags=(torch.Tag.needs_exact_strides,))
def _onednn_linear_op(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@_onednn_linear_op.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# An op of its own so that the compiler makes the copy once per forward pass: written as a
# transposed view of a copy, inductor copied the weight again inside the kernels before each
# product that read it (a product needs its operands' exact strides), every step
@torch.library.custom_op("aligndraw::column_major", mutates_args=())
def _column_major_op(weight: Tensor) -> Tensor:
    # (N, K) → (N, K) with N contiguous: a (K, N) row-major copy, viewed as (N, K)
    return torch.empty_strided(weight.shape, (1, weight.shape[0]), dtype=weight.dtype,
                               device=weight.device).copy_(weight)


@_column_major_op.register_fake
def _(weight: Tensor) -> Tensor:
    return weight.new_empty((weight.shape[1], weight.shape[0])).t()


_column_major_op.register_autograd(lambda ctx, grad: grad)


def forward_layout(weight: Tensor) -> Tensor:
    """``weight`` (N, K) laid out for many forward products x·Wᵀ, same values: column-major
    (N contiguous) where oneDNN multiplies it, else row-major (contiguous).

    oneDNN reads a column-major weight faster in these products (docs/performance.md, item
    30); the input gradient g·W is the other way round (fastest with W row-major), so a
    weight that also needs one keeps a row-major copy for it (``StepLinear``).
    """
    if _backend == "onednn" and _large(weight) and _eligible(weight):
        return _column_major_op(weight)
    return weight.contiguous()


def _onednn_grad_t_x(grad: Tensor, x: Tensor) -> Tensor:
    # (R, N), (R, K) → (N, K) as (xᵀ gradᵀ-as-weight)ᵀ, K-major (``weight_grad``)
    return torch.ops.mkldnn._linear_pointwise(x.t(), grad.t(), None, "none", [], "").t()


@torch.library.custom_op("aligndraw::onednn_weight_grad", mutates_args=())
def _onednn_weight_grad_op(grad: Tensor, x: Tensor) -> Tensor:
    # its own op so that ``aligndraw.compiler`` can find a weight's per-step gradients
    return _onednn_grad_t_x(grad, x)


@_onednn_weight_grad_op.register_fake
def _(grad: Tensor, x: Tensor) -> Tensor:
    return x.new_empty((x.shape[1], grad.shape[1])).t()


def _dense(t: Tensor) -> Tensor:
    """``t`` if its elements are packed row- or column-major (oneDNN reads either in place),
    else a packed copy: oneDNN multiplies any other layout (a column slice of a weight) with
    its reference kernel, about a thousand times slower."""
    if t.is_contiguous() or (t.dim() == 2 and t.t().is_contiguous()):
        return t
    return t.contiguous()


def _backend_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    # (..., K) · (N, K)ᵀ + (N,) → (..., N)
    if _backend == "openblas":
        out = openblas.addmm(bias, x.reshape(-1, x.shape[-1]), weight.t())  # (R, K)·(K, N) → (R, N)
        return out.view(*x.shape[:-1], weight.shape[0])  # (..., N)
    x, weight = _dense(x), _dense(weight)
    # Under torch.compile an opaque custom op: inductor's own lowering of the oneDNN op
    # expects a prepacked weight. Eagerly the op is called directly (a custom op's
    # dispatch costs microseconds at every one of a step's products).
    if torch.compiler.is_compiling():
        return _onednn_linear_op(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def addmm_t(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight.T (+ bias), no autograd: (..., K), (N, K), (N,) → (..., N)."""
    if uses_backend(x, weight):
        return _backend_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def mm(grad: Tensor, weight: Tensor) -> Tensor:
    """grad @ weight, no autograd: (..., N), (N, K) → (..., K) (a linear map's input gradient)."""
    if uses_backend(grad, weight):
        return _backend_linear(grad, weight.t(), None)
    return grad @ weight


def weight_grad(grad: Tensor, x: Tensor) -> Tensor:
    """gradᵀ @ x, no autograd: (R, N), (R, K) → (N, K) (a linear map's weight gradient).

    Through oneDNN it is formed as (xᵀ gradᵀ-as-weight)ᵀ, K-major: the fastest of the
    layouts measured for R = T·B rows (``benchmarks/gemm.py``); through OpenBLAS as its
    ``tmm`` op. Under torch.compile every such gradient (any R) is one op
    (``aligndraw::onednn_weight_grad`` or ``aligndraw_openblas::tmm``), so that
    ``aligndraw.compiler`` can stack a shared weight's per-step gradients into one product."""
    if _backend == "openblas" or torch.compiler.is_compiling():
        # the weight's sides decide, as for its forward product; any number of rows
        if (min(grad.shape[-1], x.shape[-1]) >= MIN_SIZE and grad.dim() == x.dim() == 2
                and grad.numel() > 0 and _eligible(grad, x)):
            if _backend == "openblas":
                return openblas.tmm(grad, x)
            return _onednn_weight_grad_op(_dense(grad), _dense(x))
    elif uses_backend(x, grad.t()):  # eager oneDNN: as its layouts were measured (R ≥ MIN_SIZE)
        return _onednn_grad_t_x(_dense(grad), _dense(x))
    return grad.t() @ x


class _Linear(torch.autograd.Function):
    """y = x Wᵀ + b through oneDNN or OpenBLAS, forward and backward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, backward_weight: Tensor | None):
        # backward_weight: the same values as weight, in the layout for the input gradient
        ctx.save_for_backward(x, weight if backward_weight is None else backward_weight)
        ctx.has_bias = bias is not None
        return _backend_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = mm(grad, weight)
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad(grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_w, grad_b, None


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None,
           backward_weight: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``, differentiable: (..., K), (N, K), (N,) → (..., N).

    CPU fp32 products with a large weight run through oneDNN or OpenBLAS when that is the
    backend (forward and both gradients); everything else is ``F.linear``. Traceable by
    ``torch.compile``. ``backward_weight``, if given, holds weight's values in the layout the
    input gradient reads (``forward_layout``); it gets no gradient of its own.
    """
    if not uses_backend(x, weight):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _Linear.apply(x, weight, bias, backward_weight)
    return _backend_linear(x, weight, bias)  # sampling: no autograd node to build


def _batched_eligible(*tensors: Tensor) -> bool:
    """Eagerly (callers leave traced products to the compiler's pass first), OpenBLAS chosen
    for batched products and loaded (here, at the first product: built once, and numpy's
    OpenBLAS set to one thread for the process), no autocast, every tensor fp32 on the CPU."""
    if _batched != "openblas" or not _cpu_fp32(*tensors):
        return False
    if not openblas.loaded():
        prepare()  # chosen by default, a failure to load falls back to aten
    return _batched == "openblas"


def _transposed(t: Tensor) -> Tensor:
    return t.transpose(1, 2)  # (P, M, K) → (P, K, M), a view: OpenBLAS reads either order


def comes_out_tall(m: int, n: int) -> bool:
    """Whether (M, N) matrices are taller than wide with more than one column: the products that
    ``tall_bmm`` and ``aligndraw.compiler``'s ``transpose_tall_products`` form transposed."""
    return m > n > 1


def tall_bmm(a: Tensor, b: Tensor) -> Tensor:
    """``torch.bmm(a, b)`` for (P, M, K), (P, K, N) → (P, M, N); where the result's matrices are
    taller than wide (M > N > 1), formed as (bᵀ aᵀ)ᵀ and returned as that transposed view: the
    same sums, the long side along the product's rows. The form ``aligndraw.compiler``'s
    ``transpose_tall_products`` gives such products where ``transposes_tall_products``."""
    if comes_out_tall(a.shape[1], b.shape[2]):
        return torch.bmm(_transposed(b), _transposed(a)).transpose(1, 2)  # (P, N, M) → (P, M, N)
    return torch.bmm(a, b)


def _product_grads(ctx, grad: Tensor, first: int) -> tuple[Tensor | None, Tensor | None]:
    """The gradients of a @ b for a and b (saved in ``ctx``, inputs ``first`` and ``first + 1``
    of the op), each only where autograd needs it: grad bᵀ (P, M, K) and aᵀ grad (P, K, N)."""
    a, b = ctx.saved_tensors
    grad_a = openblas.bmm(grad, _transposed(b)) if ctx.needs_input_grad[first] else None
    grad_b = openblas.bmm(_transposed(a), grad) if ctx.needs_input_grad[first + 1] else None
    return grad_a, grad_b


class _Bmm(torch.autograd.Function):
    """a @ b for (P, M, K), (P, K, N) through OpenBLAS's batched op, forward and both gradients."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        ctx.save_for_backward(a, b)
        return openblas.bmm(a, b)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        return _product_grads(ctx, grad, 0)


class _Baddbmm(torch.autograd.Function):
    """c + a @ b for (P, M, N), (P, M, K), (P, K, N) through OpenBLAS's batched op."""

    @staticmethod
    def forward(ctx, c: Tensor, a: Tensor, b: Tensor) -> Tensor:
        ctx.save_for_backward(a, b)
        return openblas.baddbmm(c, a, b)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        return grad, *_product_grads(ctx, grad, 1)


def _worth_batching(a: Tensor, b: Tensor) -> bool:
    """Whether a @ b, (..., M, K)·(..., K, N), has more than one row and column a matrix and
    no empty side: the products OpenBLAS's batched op takes eagerly. One-row products (the
    context mix's α_t-weighted sum) stay PyTorch's, as inductor sums them under the compiler."""
    return a.shape[-2] > 1 and b.shape[-1] > 1 and a.numel() > 0 and b.numel() > 0


def _stacked(t: Tensor, batch: torch.Size) -> Tensor:
    # (..., M, K) → (P, M, K) over the broadcast batch: a view where the batch dimensions allow
    # one, else a copy (a filterbank broadcast over channels); autograd sums its gradient back
    return t.expand(*batch, *t.shape[-2:]).reshape(-1, *t.shape[-2:])


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for (..., M, K), (..., K, N) with batch dimensions broadcast → (..., M, N),
    differentiable.

    Eagerly, CPU fp32 products of at least three dimensions, more than one row and column a
    matrix, go through OpenBLAS's batched op where it is the batched backend (the step's
    filterbank products and the context mix's stacked gradient; MKL runs AVX2 kernels on AMD
    processors); everything else, and everything under ``torch.compile`` (where
    ``aligndraw.compiler``'s pass moves the traced products), is ``a @ b``."""
    if (torch.compiler.is_compiling()  # first: no guards on the tests after it
            or min(a.dim(), b.dim()) < 3 or not _worth_batching(a, b) or not _batched_eligible(a, b)):
        return a @ b
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    out = _Bmm.apply(_stacked(a, batch), _stacked(b, batch))  # (P, M, N)
    return out.view(*batch, a.shape[-2], b.shape[-1])  # (..., M, N)


def bmm(a: Tensor, b: Tensor) -> Tensor:
    """``torch.bmm(a, b)`` for (P, M, K), (P, K, N) → (P, M, N), differentiable; eagerly through
    OpenBLAS's batched op as ``matmul`` (the caption encoder's recurrent product), else
    PyTorch's (so that a traced graph keeps its ``bmm``)."""
    if torch.compiler.is_compiling() or a.dim() != 3 or b.dim() != 3:
        return torch.bmm(a, b)
    return matmul(a, b)


def baddbmm(c: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``torch.baddbmm(c, a, b)`` (β = α = 1) for (P, M, N), (P, M, K), (P, K, N) → (P, M, N),
    differentiable; eagerly through OpenBLAS's batched op as ``matmul`` (c of the output's
    shape), else PyTorch's."""
    if (torch.compiler.is_compiling() or not c.dim() == a.dim() == b.dim() == 3
            or c.shape != (a.shape[0], a.shape[1], b.shape[2]) or not _worth_batching(a, b)
            or not _batched_eligible(c, a, b)):
        return torch.baddbmm(c, a, b)
    return _Baddbmm.apply(c, a, b)
