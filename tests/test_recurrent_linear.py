import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from aligndraw.recurrent_linear import StepLinear, StepMix, mix_weights_grad


def _recurrence(step, h0, steps=5):
    """h_{t+1} = tanh(step(h_t)); returns Σ_t h_t² weighted, so every step carries gradient."""
    h, total = h0, 0.0
    for t in range(steps):
        h = torch.tanh(step(h))
        total = total + (t + 1) * h.float().pow(2).sum()
    return total


def _linear_problem(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 6, generator=g, dtype=dtype).requires_grad_()
    bias = torch.randn(6, generator=g, dtype=dtype).requires_grad_()
    h0 = torch.randn(4, 6, generator=g, dtype=dtype).requires_grad_()
    return weight, bias, h0


def test_step_linear_gradients_equal_autograd_over_a_recurrence():
    weight, bias, h0 = _linear_problem()
    loss = _recurrence(StepLinear(weight, bias), h0)
    grads = torch.autograd.grad(loss, (weight, bias, h0))
    ref_loss = _recurrence(lambda h: F.linear(h, weight, bias), h0)
    ref = torch.autograd.grad(ref_loss, (weight, bias, h0))
    torch.testing.assert_close(loss, ref_loss)
    for got, want in zip(grads, ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


class _CopyCounter(TorchDispatchMode):
    """Counts dtype casts (aten._to_copy) of tensors with a given shape."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.count = tuple(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and tuple(args[0].shape) == self.shape:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_step_linear_under_autocast_casts_its_weight_once_and_keeps_fp32_gradients():
    weight, bias, h0 = (t.detach().float().requires_grad_() for t in _linear_problem())
    stacked = torch.cat([weight[:3], weight[3:]])  # assembled like the model's fused projection
    with _CopyCounter(weight.shape) as counter, torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _recurrence(StepLinear(stacked, bias), h0)
    assert counter.count == 1  # not once per step
    grads = torch.autograd.grad(loss, (weight, bias))
    assert all(g.dtype == torch.float32 for g in grads)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss = _recurrence(lambda h: F.linear(h, weight, bias), h0)
    ref = torch.autograd.grad(ref_loss, (weight, bias))
    torch.testing.assert_close(loss, ref_loss)  # the same bf16 products, step by step
    for got, want in zip(grads, ref, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))


def _mix_problem():
    g = torch.Generator().manual_seed(1)
    values = torch.randn(3, 5, 6, generator=g, dtype=torch.float64).requires_grad_()  # (B, L, D)
    query = torch.randn(6, 5, generator=g, dtype=torch.float64).requires_grad_()
    return values, query


def _mix_recurrence(mix, query, steps=4):
    """Weights from the previous mix (like α_t from h_dec_{t−1}); returns a weighted sum."""
    out, total = torch.zeros(3, 6, dtype=torch.float64), 0.0
    for t in range(steps):
        weights = torch.softmax(torch.tanh(out) @ query, dim=-1)  # (B, L)
        out = mix(weights)
        total = total + (t + 1) * out.pow(2).sum()
    return total


def test_step_mix_gradients_equal_autograd_over_a_recurrence():
    values, query = _mix_problem()
    loss = _mix_recurrence(StepMix(values), query)
    grads = torch.autograd.grad(loss, (values, query))
    ref_loss = _mix_recurrence(lambda w: (w[:, None, :] @ values).squeeze(1), query)
    ref = torch.autograd.grad(ref_loss, (values, query))
    torch.testing.assert_close(loss, ref_loss)
    for got, want in zip(grads, ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_mix_weights_grad_equals_a_naive_sum_over_the_width():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)  # (B, L, D)
    grad = torch.randn(3, 5, generator=g, dtype=torch.float64)  # (B, D)
    naive = torch.tensor([[sum(values[b, j, d] * grad[b, d] for d in range(5)) for j in range(4)]
                          for b in range(3)], dtype=torch.float64)
    torch.testing.assert_close(mix_weights_grad(values, grad), naive, rtol=1e-12, atol=1e-12)


def test_step_mix_and_step_linear_are_plain_products_without_gradients():
    values, _ = _mix_problem()
    weight, bias, h0 = _linear_problem()
    with torch.no_grad():
        mix, linear = StepMix(values), StepLinear(weight, bias)
        assert not mix.deferred and not linear.deferred
        w = torch.softmax(torch.randn(3, 5, dtype=torch.float64), -1)
        torch.testing.assert_close(mix(w), torch.einsum("bl,bld->bd", w, values))
        torch.testing.assert_close(linear(h0), h0 @ weight.T + bias)


def test_step_mix_keeps_the_values_dtype_under_autocast():
    values, query = (t.detach().float().requires_grad_() for t in _mix_problem())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mix = StepMix(values)
        out = mix(torch.softmax(torch.randn(3, 5), -1))
    assert out.dtype == torch.float32
    out.sum().backward()
    assert values.grad is not None and values.grad.dtype == torch.float32
