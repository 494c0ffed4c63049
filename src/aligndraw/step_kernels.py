"""A drawing step's elementwise work in C++, eagerly on the CPU in fp32: sampling, evaluation
and training.

Eagerly, PyTorch runs each elementwise operation of a step as a call of its own, each a pass
over its tensors and a trip through the dispatcher, and autograd adds as many for the gradient
(eager training's profile: 1281 ATen ops a drawing step with PyTorch's ops, 642 with these
kernels). ``csrc/step_kernels.cpp`` runs each piece in one pass per image, the images split
over PyTorch's threads (``docs/performance.md``, items 37 and 38):

- without gradients (``usable``): the alignment's context, the LSTM cell and the prior's
  sample (``context``, ``lstm``, ``prior_sample``);
- with or without them (``differentiable``): the alignment's scores (``scores``), the windows
  and filterbanks (``attend``), the LSTM cell (``lstm``) and the posterior's sample with its
  KL (``posterior_kl``), each an ``autograd.Function`` whose backward is one more op (once
  differentiable: no gradient of a gradient through them).

Under ``torch.compile`` the compiler fuses PyTorch's form itself, so it keeps PyTorch's ops; so
do other dtypes, devices and autocast.

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
from torch.autograd.function import once_differentiable

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


def differentiable(*tensors: Tensor) -> bool:
    """Whether the kernels that carry gradients (``scores``, ``attend``, ``lstm``, ``posterior_kl``)
    can take these tensors: not under ``torch.compile`` or CPU autocast, CPU fp32 tensors, and the
    kernels built (on the first call that gets this far)."""
    if torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"):
        return False
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
        return False
    return _load() is None


def usable(*tensors: Tensor) -> bool:
    """Whether the kernels without gradients (``context``, ``lstm``, ``prior_sample``) can take
    a step on these tensors: no gradient recorded, and ``differentiable``."""
    return not torch.is_grad_enabled() and differentiable(*tensors)


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


def _records(*tensors: Tensor | None) -> bool:
    """Whether autograd records an op on these tensors: the autograd function, else the op alone."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _Scores(torch.autograd.Function):
    """The alignment's scores op with its gradient op (``alignment._FactoredScores``'s math)."""

    @staticmethod
    def forward(ctx, keys2: Tensor, factors: Tensor, query2: Tensor, v: Tensor) -> Tensor:
        ctx.save_for_backward(factors, query2, v)
        return torch.ops.aligndraw_step.scores(factors, query2, FACTOR_BOUND, v)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        factors, query2, v = ctx.saved_tensors
        d_keys, d_query, d_v = torch.ops.aligndraw_step.scores_backward(grad, factors, query2,
                                                                         FACTOR_BOUND, v)
        return d_keys, None, d_query, d_v


def scores(keys2: Tensor, factors: Tensor, query2: Tensor, v: Tensor) -> Tensor:
    """``alignment.factored_scores`` in one pass per image, and its gradient in one more: keys2
    and factors (B, L, A), query2 (B, A) or (1, A), v (A,) → the scores (B, L). keys2 carries
    the keys' gradient, as there; after ``differentiable``."""
    if _records(keys2, query2, v):
        return _Scores.apply(keys2, factors, query2, v)
    return torch.ops.aligndraw_step.scores(factors, query2, FACTOR_BOUND, v)


class _Lstm(torch.autograd.Function):
    """The LSTM cell op with its gradient op: c (B, D) and the gates' shares → h, c' (B, D)."""

    @staticmethod
    def forward(ctx, c: Tensor, *parts: Tensor) -> tuple[Tensor, Tensor]:
        h, c_new, acts = torch.ops.aligndraw_step.lstm_forward(list(parts), c)
        ctx.save_for_backward(acts, c)
        ctx.one_row = [p.shape[0] == 1 for p in parts]
        return h, c_new

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h: Tensor, grad_c: Tensor) -> tuple[Tensor | None, ...]:
        acts, c = ctx.saved_tensors
        grad_gates, grad_prev = torch.ops.aligndraw_step.lstm_backward(grad_h, grad_c, acts, c)
        summed = grad_gates.sum(0, keepdim=True) if any(ctx.one_row) else None  # a share of one row
        shares = [(summed if one else grad_gates) if needed else None
                  for one, needed in zip(ctx.one_row, ctx.needs_input_grad[1:], strict=True)]
        return grad_prev if ctx.needs_input_grad[0] else None, *shares


def lstm(parts: list[Tensor], c: Tensor) -> tuple[Tensor, Tensor]:
    """``language.lstm_update(sum(parts), c)`` in one pass per image, and its gradient in one
    more: the gates' shares, each (B, 4D) or (1, 4D), rows dense, and c (B, D) → h, c (B, D).
    Without gradients after ``usable``, with them after ``differentiable``."""
    if _records(c, *parts):
        return _Lstm.apply(c, *parts)
    return torch.ops.aligndraw_step.lstm(parts, c)


class _PosteriorKl(torch.autograd.Function):
    """The posterior's sample and KL op with its gradient op."""

    @staticmethod
    def forward(ctx, post: Tensor, prior: Tensor | None, eps: Tensor) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(post, prior, eps)
        return torch.ops.aligndraw_step.posterior_kl(post, prior, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_z: Tensor, grad_kl: Tensor) -> tuple[Tensor | None, ...]:
        post, prior, eps = ctx.saved_tensors
        grad_post, grad_prior = torch.ops.aligndraw_step.posterior_kl_backward(grad_z, grad_kl, post,
                                                                               prior, eps)
        return grad_post, grad_prior if prior is not None else None, None


def posterior_kl(post: Tensor, prior: Tensor | None, eps: Tensor) -> tuple[Tensor, Tensor]:
    """The posterior's sample z = μ_q + e^(log σ_q)·ε and ``losses.gaussian_kl`` of it from the
    learned prior, in one pass per image, and their gradient in one more.

    Args: post (B, 2Z), μ_q then log σ_q; prior (B, 2Z), the prior's pre-activations (μ_p,
    log σ_p = their tanh, as ``AlignDraw._prior``), or None for N(0, I); eps (B, Z), the noise,
    which gets no gradient (one that requires it is refused). After ``differentiable``.

    Returns: z (B, Z) and the KL (B,).
    """
    if _records(eps):
        raise ValueError("posterior_kl gives the noise eps no gradient; it must not require one "
                         "(AlignDraw.forward keeps PyTorch's ops for such noise)")
    if _records(post, prior):
        return _PosteriorKl.apply(post, prior, eps)
    return torch.ops.aligndraw_step.posterior_kl(post, prior, eps)


def prior_sample(pre: Tensor, eps: Tensor) -> Tensor:
    """z = μ + e^(log σ)·ε with μ, log σ = tanh(pre).chunk(2): pre (B, 2Z), eps (B, Z) → z (B, Z),
    in one pass per image; after ``usable``."""
    return torch.ops.aligndraw_step.prior_sample(pre, eps)


class _Attend(torch.autograd.Function):
    """The attend op with its gradient op: windows' raw numbers → γ, F_x, F_y."""

    @staticmethod
    def forward(ctx, height: int, width: int, n: int, eps: float, flush: float,
                *params: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        gamma, f_x, f_y = torch.ops.aligndraw_step.attend(list(params), height, width, n, eps, flush)
        ctx.save_for_backward(f_x, f_y, *params)
        ctx.height, ctx.width = height, width
        return gamma, f_x, f_y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_gamma: Tensor, grad_x: Tensor, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        f_x, f_y, *params = ctx.saved_tensors
        grad = torch.ops.aligndraw_step.attend_backward(grad_gamma, grad_x, grad_y, f_x, f_y, params,
                                                        ctx.height, ctx.width)  # (R, 5)
        return None, None, None, None, None, *grad.split([p.shape[0] for p in params])


def attend(params: list[Tensor], height: int, width: int, n: int, eps: float,
           flush: float) -> tuple[Tensor, Tensor, Tensor]:
    """``attention.window_params`` and ``attention.filterbanks`` of several sets of windows with a
    grid of n, in one pass per window, and their gradient in one more: params, each (B_k, 5) →
    γ (R,), F_x (R, n, W), F_y (R, n, H) for the R = Σ B_k windows in order; weights e^u with
    u < ``flush`` set to 0. After ``differentiable``."""
    if _records(*params):
        return _Attend.apply(height, width, n, eps, flush, *params)
    return torch.ops.aligndraw_step.attend(params, height, width, n, eps, flush)
