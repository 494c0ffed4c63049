"""A linear layer shared by every step of a recurrence, with one weight gradient for all steps.

Autograd computes the gradient of a weight used at T steps as T separate (out × B)·(B × in)
matrix products plus T − 1 accumulations into ``.grad``. ``StepLinear`` instead records each
step's input and output gradient during the backward pass and, once every step is done,
computes the weight gradient as one (out × T·B)·(T·B × in) product: the same sum, fewer and
larger matrix multiplies, no accumulation traffic. The input gradient is still computed per
step (the recurrence needs it).

Works under autocast: the weight is cast to the autocast dtype once per ``StepLinear`` (not
once per step), each step computes in that dtype, and gradients come back in the dtypes of the
inputs (the weight gradient in the parameter's own dtype). The products go through
``aligndraw.gemm`` (oneDNN for CPU fp32 where it is faster than the default BLAS).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from aligndraw import gemm


class _Record:
    """Per-step inputs and output gradients, in backward order, and how to sum them.

    ``reduce(inputs, grads)`` turns the recorded steps into the gradients of the shared
    tensors (one product over all steps).
    """

    def __init__(self, reduce: Callable[[list[Tensor], list[Tensor]], tuple[Tensor, ...]]) -> None:
        self.inputs: list[Tensor] = []
        self.grads: list[Tensor] = []
        self.reduce = reduce


def _compute_dtype(x: Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _deferred(*tensors: Tensor) -> bool:
    """Whether to record the steps: gradients wanted, and not under torch.compile (the
    recording, a Python side effect, would break the graph; ``aligndraw.compiler``'s graph
    pass stacks the per-step gradients there instead)."""
    return (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
            and not torch.compiler.is_compiling())


class _Share(torch.autograd.Function):
    """Identity on the shared tensors whose backward returns the recorded steps' summed gradients."""

    @staticmethod
    def forward(ctx, record: _Record, *shared: Tensor):
        ctx.record, ctx.dtypes = record, [t.dtype for t in shared]
        ctx.set_materialize_grads(False)  # the steps return no gradient for them themselves
        return tuple(t.view_as(t) for t in shared)

    @staticmethod
    def backward(ctx, *unused):
        record = ctx.record
        if not record.inputs:
            return (None,) * (1 + len(ctx.dtypes))
        grads = record.reduce(record.inputs, record.grads)
        record.inputs.clear()
        record.grads.clear()
        return (None, *(g.to(dtype) for g, dtype in zip(grads, ctx.dtypes, strict=True)))


def _linear_grads(inputs: list[Tensor], grads: list[Tensor]) -> tuple[Tensor, Tensor]:
    x = torch.cat(inputs)  # (T·B, in)
    g = torch.cat(grads)  # (T·B, out)
    return gemm.weight_grad(g, x), g.sum(0)  # weight (out, in), bias (out,)


class _Step(torch.autograd.Function):
    """y = x Wᵀ + b for one step; records (x, g) instead of returning a weight gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, record: _Record,
                backward_weight: Tensor | None):
        # ``StepLinear`` gave weight and bias the compute dtype once; a step only casts x (under
        # autocast the product then finds its operands in autocast's dtype and casts nothing).
        xc = x.to(weight.dtype)
        out = gemm.addmm_t(xc, weight, bias)
        ctx.save_for_backward(xc, weight if backward_weight is None else backward_weight)
        ctx.record, ctx.x_dtype = record, x.dtype
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        xc, wc = ctx.saved_tensors
        grad = grad.to(wc.dtype)
        ctx.record.inputs.append(xc)
        ctx.record.grads.append(grad)
        return gemm.mm(grad, wc).to(ctx.x_dtype), None, None, None, None


def _layouts(weight: Tensor) -> tuple[Tensor, Tensor | None]:
    """A (N, K) weight packed once per forward pass, not at every step's product (weights are
    often column slices, e.g. an LSTM's W_ih[:, :Z], and ``gemm`` packs what it is given):
    for the forward products as ``gemm.forward_layout`` lays it out (column-major under
    oneDNN), and where gradients are on and that is another layout, row-major for the input
    gradients (which oneDNN reads fastest that way); else None."""
    if not torch.is_grad_enabled():
        return gemm.forward_layout(weight), None
    rows = weight.contiguous()  # (N, K) row-major
    forward = gemm.forward_layout(rows)
    return forward, (None if forward is rows else rows)


class StepLinear:
    """``F.linear(x, weight, bias)`` for every step of one forward pass.

    Build one per forward pass (after the weight is assembled) and call it at each step.
    Without gradients (sampling, evaluation) it is a plain ``F.linear``.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        if bias is None:
            bias = weight.new_zeros(weight.shape[0])
        self.deferred = _deferred(weight, bias)
        if self.deferred:
            self.record = _Record(_linear_grads)
            weight, bias = _Share.apply(self.record, weight, bias)
        # Under autocast, cast the shared weight once here rather than at every step: autocast
        # caches casts of leaf parameters only, and this weight is usually assembled (torch.cat).
        dtype = _compute_dtype(weight)
        self.weight, self.backward_weight = _layouts(weight.to(dtype))
        self.bias = bias.to(dtype)

    def __call__(self, x: Tensor) -> Tensor:
        if not self.deferred:
            return gemm.linear(x, self.weight, self.bias, self.backward_weight)
        return _Step.apply(x, self.weight, self.bias, self.record, self.backward_weight)


def _mix(weights: Tensor, values: Tensor) -> Tensor:
    return (weights[:, None, :] @ values).squeeze(1)  # (B, 1, L) @ (B, L, D) → (B, D)


def mix_weights_grad(values: Tensor, grad: Tensor) -> Tensor:
    """The mix's gradient for its weights, Σ_d values[b, l, d]·grad[b, d]: (B, L, D), (B, D) → (B, L).

    Written with one row per image on the left, (B, 1, D)·(B, D, L): the same product as
    (B, L, D)·(B, D, 1), which the CPU batched product runs about nine times slower
    (``benchmarks/context_mix.py``, form ``grad_column``).
    """
    return (grad[:, None, :] @ values.transpose(1, 2)).squeeze(1)  # (B, 1, D) @ (B, D, L) → (B, L)


def _mix_grads(inputs: list[Tensor], grads: list[Tensor]) -> tuple[Tensor]:
    weights = torch.stack(inputs, dim=1)  # (B, T, L)
    g = torch.stack(grads, dim=1)  # (B, T, D)
    return (gemm.matmul(weights.transpose(1, 2), g),)  # (B, L, T) @ (B, T, D) → (B, L, D)


class _MixStep(torch.autograd.Function):
    """y = Σ_j w_j values_j per image for one step; records (w, g) instead of a values gradient."""

    @staticmethod
    def forward(ctx, weights: Tensor, values: Tensor, record: _Record):
        ctx.save_for_backward(weights, values)
        ctx.record = record
        return _mix(weights, values)

    @staticmethod
    def backward(ctx, grad: Tensor):
        weights, values = ctx.saved_tensors
        ctx.record.inputs.append(weights)
        ctx.record.grads.append(grad)
        grad_weights = mix_weights_grad(values, grad)  # (B, L)
        return grad_weights, None, None


class StepMix:
    """Per-image weighted sums of the same values at every step: (B, L) weights → (B, D).

    The values (B, L, D) are shared by every step of one forward pass (the caption's words'
    contributions); each step mixes them with its own weights w_t. Autograd would form the
    values' gradient as T outer products w_tᵀ g_t of shape (B, L, D) and add them up, a pass
    over B·L·D values per step; ``StepMix`` records every step's w_t and g_t and computes the
    gradient once as one batched product with K = T. Without gradients it is a plain product.

    The mix computes in the values' dtype also under autocast (a bf16 batched product with
    one row per image is slower on CPU than fp32, ``benchmarks/context_mix.py``); the weights
    are cast to it.
    """

    def __init__(self, values: Tensor) -> None:
        self.deferred = _deferred(values)
        if self.deferred:
            self.record = _Record(_mix_grads)
            (values,) = _Share.apply(self.record, values)
        self.values = values
        self.autocast = torch.is_autocast_enabled(values.device.type)

    def __call__(self, weights: Tensor) -> Tensor:
        weights = weights.to(self.values.dtype)
        if self.autocast:  # checked once: entering the context at every step costs time
            with torch.autocast(self.values.device.type, enabled=False):
                return self._apply(weights)
        return self._apply(weights)

    def _apply(self, weights: Tensor) -> Tensor:
        if not self.deferred:
            return _mix(weights, self.values)
        return _MixStep.apply(weights, self.values, self.record)
