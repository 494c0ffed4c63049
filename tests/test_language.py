import pytest
import torch

from aligndraw.language import lstm_update, sigmoid_tanh, takes_sigmoid_form


def reference_lstm_update(gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.LSTMCell's update, written out with torch.tanh."""
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def spread(n: int, dtype: torch.dtype) -> torch.Tensor:
    """Values from 1e-6 to saturation, both signs, and exact zeros."""
    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([1e-6, 1e-3, 0.1, 1.0, 3.0, 10.0, 100.0], dtype=torch.float64)
    x = torch.randn(len(scales), n, generator=gen, dtype=torch.float64) * scales[:, None]
    return torch.cat([x.flatten(), torch.zeros(3, dtype=torch.float64)]).to(dtype)


def test_tanh_equals_torch_tanh_in_fp64_and_to_fp32_rounding() -> None:
    x64 = spread(20_000, torch.float64)
    torch.testing.assert_close(sigmoid_tanh(x64), torch.tanh(x64), rtol=0, atol=1e-15)
    x32 = x64.float()
    err = (sigmoid_tanh(x32).double() - torch.tanh(x64)).abs()
    assert err.max() < 2.5e-7  # a few units of fp32 rounding at 1 (a NaN or inf would fail it too)
    # saturation and the sign survive
    big = torch.tensor([-1e4, -100.0, 100.0, 1e4])
    assert torch.equal(sigmoid_tanh(big), torch.tensor([-1.0, -1.0, 1.0, 1.0]))


def test_tanh_gradient_equals_torch_tanh_gradient() -> None:
    x = spread(2_000, torch.float64).requires_grad_()
    (g_ours,) = torch.autograd.grad(sigmoid_tanh(x).sum(), x)
    (g_ref,) = torch.autograd.grad(torch.tanh(x).sum(), x)
    torch.testing.assert_close(g_ours, g_ref, rtol=0, atol=1e-14)


def test_the_sigmoid_form_is_taken_for_fp32_and_fp64_on_the_cpu_only() -> None:
    assert takes_sigmoid_form(torch.zeros(2)) and takes_sigmoid_form(torch.zeros(2, dtype=torch.float64))
    assert not takes_sigmoid_form(torch.zeros(2, dtype=torch.bfloat16))
    assert not takes_sigmoid_form(torch.zeros(2, dtype=torch.float16))
    assert not takes_sigmoid_form(torch.zeros(2, device="meta"))  # any other device keeps torch.tanh


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_keeps_torch_tanh_exactly(dtype) -> None:
    x = spread(1_000, torch.float32).clamp(-60, 60).to(dtype)
    assert torch.equal(sigmoid_tanh(x), torch.tanh(x))
    gates = torch.randn(4, 3, 20).to(dtype)
    c = torch.randn(4, 3, 5).to(dtype)
    for ours, ref in zip(lstm_update(gates, c), reference_lstm_update(gates, c), strict=True):
        assert torch.equal(ours, ref)


def assert_equals_the_tanh_form_with_gradients(update, shape: tuple[int, ...], seed: int) -> None:
    """update(gates, c) against nn.LSTMCell's formula in fp64, values and gradients."""
    gen = torch.Generator().manual_seed(seed)
    gates = (3 * torch.randn(shape, generator=gen, dtype=torch.float64)).requires_grad_()
    c = torch.randn(*shape[:-1], shape[-1] // 4, generator=gen, dtype=torch.float64).requires_grad_()
    ours, ref = update(gates, c), reference_lstm_update(gates, c)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
    weights = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in ref]
    g_ours = torch.autograd.grad(ours, (gates, c), weights)
    g_ref = torch.autograd.grad(ref, (gates, c), weights)
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


@pytest.mark.parametrize("shape", [(7, 4 * 5), (2, 3, 4 * 8)])
def test_lstm_update_equals_the_tanh_form_with_gradients(shape) -> None:
    assert_equals_the_tanh_form_with_gradients(lstm_update, shape, seed=1)


def test_lstm_update_names_gates_that_are_not_four_shares() -> None:
    with pytest.raises(ValueError, match=r"4·D .*\(3, 10\)"):
        lstm_update(torch.zeros(3, 10), torch.zeros(3, 2))


def test_lstm_update_fp32_stays_within_rounding_of_fp64() -> None:
    gen = torch.Generator().manual_seed(2)
    gates = 3 * torch.randn(100, 4 * 300, generator=gen)
    c = torch.randn(100, 300, generator=gen)
    h_ref, c_ref = reference_lstm_update(gates.double(), c.double())
    h, c_new = lstm_update(gates, c)
    assert (h.double() - h_ref).abs().max() < 5e-7
    assert (c_new.double() - c_ref).abs().max() < 1e-6


def test_compiled_lstm_update_takes_the_gates_apart() -> None:
    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    gates, c = torch.randn(6, 4 * 5), torch.randn(6, 5)
    torch.compile(lstm_update, backend=keep_graph, fullgraph=True, dynamic=False)(gates, c)
    calls = [str(node.target) for node in graphs[0].graph.nodes]
    assert not any("ones" in call or "setitem" in call for call in calls)  # no (4D,) vector
    assert sum("sigmoid" in call for call in calls) == 5  # i, f, 2g, o and the cell's tanh


def test_compiled_lstm_update_equals_the_tanh_form_with_gradients() -> None:
    # under torch.compile lstm_update takes each gate's sigmoid apart: the same function
    compiled = torch.compile(lstm_update, fullgraph=True, dynamic=False)
    assert_equals_the_tanh_form_with_gradients(compiled, (6, 4 * 5), seed=3)
    gen = torch.Generator().manual_seed(4)
    x32, c32 = 3 * torch.randn(6, 4 * 5, generator=gen), torch.randn(6, 5, generator=gen)
    for a, b in zip(compiled(x32, c32), lstm_update(x32, c32), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-7)  # eager fp32, to rounding
