"""A drawing step's elementwise work in C++ where no gradient is recorded (eager sampling and
evaluation on the CPU).

Eagerly, PyTorch runs each elementwise operation of a step as a call of its own: the
alignment's scores, softmax and context mix take about a dozen, the LSTM cell as many, the
prior's sample five, each a pass over its tensors and a trip through the dispatcher. Without
gradients nothing needs those intermediate tensors, so ``csrc/step_kernels.cpp`` runs each
piece in one pass per image, the images split over PyTorch's threads (``docs/performance.md``,
item 37). Under ``torch.compile`` the compiler fuses PyTorch's form itself, and training needs
the gradients, so both keep PyTorch's ops; so do other dtypes, devices and autocast.

The kernels are compiled on first use for the processor's vector instructions, through
PyTorch's own ``at::vec`` (AVX-512 or AVX2 with FMA, as inductor compiles its kernels; else
the portable form), and cached by PyTorch's extension builder. ``ALIGNDRAW_STEP_KERNELS=0``
keeps PyTorch's ops and builds nothing. The results equal PyTorch's ops to fp32 rounding (the
order of the sums, and exp from SLEEF, which PyTorch's vectorised CPU ops use too).
"""

from __future__ import annotations

import functools
import logging
import os

import torch
from torch import Tensor

from aligndraw import extensions, gemm
from aligndraw.alignment import FACTOR_BOUND

log = logging.getLogger(__name__)

SOURCE = "step_kernels.cpp"
ENV = "ALIGNDRAW_STEP_KERNELS"  # "0": PyTorch's ops, and no build

# The compiler's flags per vector instruction set, as inductor's CPU kernels take them
# (torch._inductor.cpu_vec_isa): the processor's flags each needs, the flags and the name.
ISAS = (
    (frozenset({"avx512f", "avx512dq", "avx512vl", "avx512bw", "fma"}),
     ("-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma",
      "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"), "avx512"),
    (frozenset({"avx2", "fma", "f16c"}),
     ("-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"), "avx2"),
)


def isa(flags: frozenset[str]) -> tuple[tuple[str, ...], str]:
    """The compiler's flags and a name for a processor with these feature flags (``/proc/cpuinfo``'s):
    AVX-512, AVX2 with FMA, or the portable form (``at::vec``'s default) where neither."""
    for needs, cflags, name in ISAS:
        if needs <= flags:
            return cflags, name
    return ("-DCPU_CAPABILITY=DEFAULT",), "default"


def _turned_off() -> str | None:
    return f"{ENV}=0" if os.environ.get(ENV, "1").strip() == "0" else None


def missing() -> str | None:
    """Why the kernels cannot be used here: turned off by ``ALIGNDRAW_STEP_KERNELS=0``, no C++
    compiler or no ninja; None if they can be built. Cheap: builds nothing."""
    return _turned_off() or extensions.missing("the step kernels")


@functools.cache
def _load() -> str | None:
    """Build (once, cached) and load the kernels; None, or why they could not be."""
    instead = "a drawing step's elementwise work runs in PyTorch's ops"
    if why := _turned_off():
        log.info("%s: %s", why, instead)
        return why
    cflags, name = isa(gemm.cpu_flags())
    return extensions.load_or_why(log, f"aligndraw_step_kernels_{name}", SOURCE,
                                  f"the step kernels ({name})", instead, f"{ENV}=0",
                                  openmp=True, flags=cflags)


def usable(*tensors: Tensor) -> bool:
    """Whether the kernels can take a step on these tensors: no gradient recorded, not under
    ``torch.compile`` or CPU autocast, CPU fp32 tensors, and the kernels built (on the first
    call that gets this far)."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"):
        return False
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
        return False
    return _load() is None


def context(factors: Tensor, query2: Tensor, v: Tensor, mask: Tensor,
            values: Tensor) -> tuple[Tensor, Tensor]:
    """α_t and Σ_j α_j values_j in one pass per image.

    Args: factors (B, L, A) = ``alignment.key_factors(keys2)``, query2 (B, A) or (1, A), v (A,),
    mask (B, L) True on real words, values (B, L, D) (the words' shares of the generative gates,
    ``AlignDraw.context_gates``); after ``usable``.

    Returns: α_t (B, L), as ``alignment.factored_align_weights``, and the mix (B, D), as
    ``recurrent_linear.StepMix``.
    """
    return torch.ops.aligndraw_step.context(factors, query2, FACTOR_BOUND, v, mask, values)


def lstm(parts: list[Tensor], c: Tensor) -> tuple[Tensor, Tensor]:
    """``language.lstm_update(sum(parts), c)`` in one pass per image: the gates' shares, each
    (B, 4D) or (1, 4D), rows dense, and c (B, D) → h, c (B, D); after ``usable``."""
    return torch.ops.aligndraw_step.lstm(parts, c)


def prior_sample(pre: Tensor, eps: Tensor) -> Tensor:
    """z = μ + e^(log σ)·ε with μ, log σ = tanh(pre).chunk(2): pre (B, 2Z), eps (B, Z) → z (B, Z),
    in one pass per image; after ``usable``."""
    return torch.ops.aligndraw_step.prior_sample(pre, eps)
