"""A linear layer shared by every step of a recurrence, with one weight gradient for all steps.

Autograd computes the gradient of a weight used at T steps as T separate (out × B)·(B × in)
matrix products plus T − 1 accumulations into ``.grad``. ``StepLinear`` instead records each
step's input and output gradient during the backward pass and, once every step is done,
computes the weight gradient as one (out × T·B)·(T·B × in) product: the same sum, fewer and
larger matrix multiplies, no accumulation traffic. The input gradient is still computed per
step (the recurrence needs it).

Works under autocast: the weight is cast to the autocast dtype once per ``StepLinear`` (not
once per step), each step computes in that dtype, and gradients come back in the dtypes of the
inputs (the weight gradient in the parameter's own dtype).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class _Record:
    """Inputs x_t (B, in) and output gradients g_t (B, out) of every step, in backward order."""

    def __init__(self) -> None:
        self.inputs: list[Tensor] = []
        self.grads: list[Tensor] = []


def _compute_dtype(x: Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class _Share(torch.autograd.Function):
    """Identity on (weight, bias) whose backward sums the recorded steps' gradients."""

    @staticmethod
    def forward(ctx, weight: Tensor, bias: Tensor, record: _Record):
        ctx.record, ctx.dtypes = record, (weight.dtype, bias.dtype)
        ctx.set_materialize_grads(False)  # the steps return no weight gradient themselves
        return weight.view_as(weight), bias.view_as(bias)

    @staticmethod
    def backward(ctx, grad_weight, grad_bias):
        record = ctx.record
        if not record.inputs:
            return None, None, None
        x = torch.cat(record.inputs)  # (T·B, in)
        g = torch.cat(record.grads)  # (T·B, out)
        record.inputs.clear()
        record.grads.clear()
        return (g.t() @ x).to(ctx.dtypes[0]), g.sum(0).to(ctx.dtypes[1]), None


class _Step(torch.autograd.Function):
    """y = x Wᵀ + b for one step; records (x, g) instead of returning a weight gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, record: _Record):
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xc, wc = x.to(dtype), weight.to(dtype)
            out = torch.addmm(bias.to(dtype), xc, wc.t())
        ctx.save_for_backward(xc, wc)
        ctx.record, ctx.x_dtype = record, x.dtype
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        xc, wc = ctx.saved_tensors
        grad = grad.to(wc.dtype)
        ctx.record.inputs.append(xc)
        ctx.record.grads.append(grad)
        return (grad @ wc).to(ctx.x_dtype), None, None, None


class StepLinear:
    """``F.linear(x, weight, bias)`` for every step of one forward pass.

    Build one per forward pass (after the weight is assembled) and call it at each step.
    Without gradients (sampling, evaluation) it is a plain ``F.linear``.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        if bias is None:
            bias = weight.new_zeros(weight.shape[0])
        # Under torch.compile the recording (a Python side effect) would break the graph, and the
        # compiler schedules the weight gradients itself: use the plain linear there.
        self.deferred = (torch.is_grad_enabled() and (weight.requires_grad or bias.requires_grad)
                         and not torch.compiler.is_compiling())
        if self.deferred:
            self.record = _Record()
            weight, bias = _Share.apply(weight, bias, self.record)
        # Under autocast, cast the shared weight once here rather than at every step: autocast
        # caches casts of leaf parameters only, and this weight is usually assembled (torch.cat).
        dtype = _compute_dtype(weight)
        self.weight, self.bias = weight.to(dtype), bias.to(dtype)

    def __call__(self, x: Tensor) -> Tensor:
        if not self.deferred:
            return F.linear(x, self.weight, self.bias)
        return _Step.apply(x, self.weight, self.bias, self.record)


class _ShareValues(torch.autograd.Function):
    """Identity on per-image values (B, L, D) whose backward sums the recorded steps' gradients."""

    @staticmethod
    def forward(ctx, values: Tensor, record: _Record):
        ctx.record = record
        ctx.set_materialize_grads(False)  # the steps return no gradient for the values themselves
        return values.view_as(values)

    @staticmethod
    def backward(ctx, grad_values):
        record = ctx.record
        if not record.inputs:
            return None, None
        weights = torch.stack(record.inputs, dim=1)  # (B, T, L)
        grads = torch.stack(record.grads, dim=1)  # (B, T, D)
        record.inputs.clear()
        record.grads.clear()
        return weights.transpose(1, 2) @ grads, None  # (B, L, T) @ (B, T, D) → (B, L, D)


class _MixStep(torch.autograd.Function):
    """y = Σ_j w_j values_j per image for one step; records (w, g) instead of a values gradient."""

    @staticmethod
    def forward(ctx, weights: Tensor, values: Tensor, record: _Record):
        ctx.save_for_backward(weights, values)
        ctx.record = record
        return (weights[:, None, :] @ values).squeeze(1)  # (B, 1, L) @ (B, L, D) → (B, D)

    @staticmethod
    def backward(ctx, grad: Tensor):
        weights, values = ctx.saved_tensors
        ctx.record.inputs.append(weights)
        ctx.record.grads.append(grad)
        grad_weights = (values @ grad[:, :, None]).squeeze(-1)  # (B, L, D) @ (B, D, 1) → (B, L)
        return grad_weights, None, None


class StepMix:
    """Per-image weighted sums of the same values at every step: (B, L) weights → (B, D).

    The values (B, L, D) are shared by every step of one forward pass (the caption's words'
    contributions); each step mixes them with its own weights w_t. Autograd would form the
    values' gradient as T outer products w_tᵀ g_t of shape (B, L, D) and add them up, a pass
    over B·L·D values per step; ``StepMix`` records every step's w_t and g_t and computes the
    gradient once as one batched product with K = T. Without gradients it is a plain product.
    """

    def __init__(self, values: Tensor) -> None:
        self.deferred = (torch.is_grad_enabled() and values.requires_grad
                         and not torch.compiler.is_compiling())
        if self.deferred:
            self.record = _Record()
            values = _ShareValues.apply(values, self.record)
        self.values = values

    def __call__(self, weights: Tensor) -> Tensor:
        if not self.deferred:
            return (weights[:, None, :] @ self.values).squeeze(1)  # (B, 1, L) @ (B, L, D) → (B, D)
        return _MixStep.apply(weights, self.values, self.record)
