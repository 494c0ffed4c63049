import contextlib
import os

import pytest
import torch
import torch._functorch.config as functorch_config
from torch._inductor.utils import run_and_get_code
from torch.fx.experimental.proxy_tensor import make_fx

from aligndraw import alignment, compiler, gemm, openblas
from aligndraw.language import padding_mask
from aligndraw.model import AlignDraw
from aligndraw.recurrent_linear import StepLinear, StepMix

from conftest import needs_onednn, needs_openblas, random_batch, relative_distance, tiny_config
from conftest import seeded_randn as _rand


def _traced(f, *args):
    """An aten graph of ``f`` with fake values in its nodes' meta, as inductor's passes see it."""
    return make_fx(f, tracing_mode="fake")(*args)


def _count(gm, target):
    return sum(n.op == "call_function" and n.target is target for n in gm.graph.nodes)


def _rewritten(f, *args):
    gm = _traced(f, *args)
    changed = compiler.stack_products(gm.graph)
    gm.recompile()
    return gm, changed


def _sum_of_mms(a1, b1, a2, b2, a3, b3):
    return a1 @ b1 + a2 @ b2 + a3 @ b3  # (M, K_i) @ (K_i, N), different K_i


def test_a_sum_of_products_becomes_one_product_of_stacked_operands():
    args = (_rand(5, 3), _rand(3, 7, seed=1), _rand(5, 4, seed=2), _rand(4, 7, seed=3),
            _rand(5, 2, seed=4), _rand(2, 7, seed=5))
    gm, changed = _rewritten(_sum_of_mms, *args)
    assert changed == 1 and _count(gm, torch.ops.aten.mm.default) == 1
    torch.testing.assert_close(gm(*args), _sum_of_mms(*args))


def test_symbolic_sizes_are_stacked_too():
    # the trainer's captions vary in length: its compiled graphs have symbolic sizes
    args = (_rand(5, 3), _rand(3, 7, seed=1), _rand(5, 4, seed=2), _rand(4, 7, seed=3),
            _rand(5, 2, seed=4), _rand(2, 7, seed=5))
    gm = make_fx(_sum_of_mms, tracing_mode="symbolic")(*args)
    assert compiler.stack_products(gm.graph) == 1
    gm.recompile()
    assert _count(gm, torch.ops.aten.mm.default) == 1
    torch.testing.assert_close(gm(*args), _sum_of_mms(*args))


def _sum_of_outer_products(w1, g1, w2, g2):
    # the context mix's per-step values gradient: (B, L, 1) @ (B, 1, D), summed over steps
    return w1[:, :, None] @ g1[:, None, :] + w2[:, :, None] @ g2[:, None, :]


def test_batched_products_are_stacked_along_their_inner_dimension():
    args = (_rand(4, 6), _rand(4, 9, seed=1), _rand(4, 6, seed=2), _rand(4, 9, seed=3))
    gm, changed = _rewritten(_sum_of_outer_products, *args)
    assert changed == 1 and _count(gm, torch.ops.aten.bmm.default) == 1
    torch.testing.assert_close(gm(*args), _sum_of_outer_products(*args))


def _mixed_sum(a1, b1, a2, b2, c, d1, e1):
    # two stackable products, a plain tensor, and a product of another shape's operands
    # whose (5, 7) output still adds up: (5, 6) @ (6, 7)
    return a1 @ b1 + c + a2 @ b2 + d1 @ e1


def test_other_addends_are_kept():
    args = (_rand(5, 3), _rand(3, 7, seed=1), _rand(5, 3, seed=2), _rand(3, 7, seed=3),
            _rand(5, 7, seed=4), _rand(5, 6, seed=5), _rand(6, 7, seed=6))
    gm, changed = _rewritten(_mixed_sum, *args)
    assert changed == 1 and _count(gm, torch.ops.aten.mm.default) == 1  # all three stack
    torch.testing.assert_close(gm(*args), _mixed_sum(*args))


def _product_used_twice(a1, b1, a2, b2):
    p = a1 @ b1
    return p + a2 @ b2, p * 2  # p is needed on its own too: stacking would compute it twice


def test_products_used_elsewhere_are_left_alone():
    args = (_rand(5, 3), _rand(3, 7, seed=1), _rand(5, 3, seed=2), _rand(3, 7, seed=3))
    gm, changed = _rewritten(_product_used_twice, *args)
    assert changed == 0 and _count(gm, torch.ops.aten.mm.default) == 2
    for got, want in zip(gm(*args), _product_used_twice(*args), strict=True):
        torch.testing.assert_close(got, want)


def _viewed_product_used_twice(a1, b1, a2, b2):
    p, q = torch.bmm(a1, b1), torch.bmm(a2, b2)  # (2, 5, 7) each
    return p.reshape(2, 35) + q.reshape(2, 35), p * q


def test_viewed_products_used_elsewhere_are_left_alone():
    args = (_rand(2, 5, 3), _rand(2, 3, 7, seed=1), _rand(2, 5, 3, seed=2), _rand(2, 3, 7, seed=3))
    gm, changed = _rewritten(_viewed_product_used_twice, *args)
    assert changed == 0 and _count(gm, torch.ops.aten.bmm.default) == 2
    for got, want in zip(gm(*args), _viewed_product_used_twice(*args), strict=True):
        torch.testing.assert_close(got, want)


def _weight_grads_over_steps(g1, x1, g2, x2):
    return g1.T @ x1 + g2.T @ x2  # (N, K): a weight's per-step gradients, as ``aten.mm``


@pytest.mark.skipif(not compiler.lower_stack_rows(), reason="this PyTorch's inductor lacks the hook")
def test_cpu_row_stacks_become_stack_rows():
    args = (_rand(5, 7), _rand(5, 3, seed=1), _rand(5, 7, seed=2), _rand(5, 3, seed=3))
    gm, changed = _rewritten(_weight_grads_over_steps, *args)
    # gᵀ's are stacked along their columns (cat), the x's along their rows (stack_rows)
    assert changed == 1 and _count(gm, torch.ops.aligndraw.stack_rows.default) == 1
    assert _count(gm, torch.ops.aten.cat.default) == 1
    torch.testing.assert_close(gm(*args), _weight_grads_over_steps(*args))


def _stack_after_products(a, w, x):
    # parts computed by a kernel and first read by a product (which fixes their layouts, as a
    # step's gradient is read by its input-gradient product): two plain ones, one a column
    # concatenation (as a step's gradient is), one also returned, one listed twice; and a
    # graph input, and a part still open (the flip: inductor computes it in the stack itself)
    parts = [torch.tanh(a[i]) * (i + 1) for i in range(4)]  # (R, N) each
    parts[2] = torch.cat([torch.sigmoid(a[2, :, :2]), torch.tanh(a[2, :, 2:])], dim=1)
    products = [p @ w for p in parts]  # (R, K) each
    stack = torch.ops.aligndraw.stack_rows([*parts, parts[0], x, a[0].flip(0)])  # (7R, N)
    return stack * 2, parts[3], *products


def _recording(monkeypatch) -> list[bool]:
    """``compiler._computed_in_place``'s answers, in order, from now on."""
    decided, in_place = [], compiler._computed_in_place

    def recorded(src, dst):
        decided.append(in_place(src, dst))
        return decided[-1]

    monkeypatch.setattr(compiler, "_computed_in_place", recorded)
    return decided


@pytest.mark.parametrize("cpp_wrapper", [False, True])
def test_stacked_parts_with_fixed_layouts_are_computed_in_place(monkeypatch, cpp_wrapper):
    assert compiler.lower_stack_rows()
    decided = _recording(monkeypatch)
    args = (_rand(4, 4, 6), _rand(6, 5, seed=1), _rand(4, 6, seed=2))
    torch._dynamo.reset()
    with torch.compiler.config.patch(force_disable_caches=True):
        got = torch.compile(_stack_after_products, options={"cpp_wrapper": cpp_wrapper})(*args)
    # asked about the two plain parts and the concatenation (computed in place), the second
    # listing of the first part and the input (copied); never about the returned part (copied)
    # or the flip (inductor's own rule)
    assert decided == [True, True, True, False, False]
    for g, w in zip(got, _stack_after_products(*args), strict=True):
        torch.testing.assert_close(g, w)


def _unfused(f, *args):
    gm = _traced(f, *args)
    changed = compiler.unfuse_cpu_bias(gm.graph)
    gm.recompile()
    return gm, changed


def _gates(bias, x, w):
    # an LSTM's gates: a biased product, split into four, through nonlinearities (all pointwise)
    i, f, g, o = torch.addmm(bias, x, w).chunk(4, dim=1)
    return torch.sigmoid(i) * torch.tanh(g) + torch.sigmoid(f) * torch.sigmoid(o)


def test_a_biased_product_feeding_pointwise_ops_adds_its_bias_in_them():
    args = (_rand(8), _rand(5, 3, seed=1), _rand(3, 8, seed=2))
    gm, changed = _unfused(_gates, *args)
    assert changed == 1 and _count(gm, torch.ops.aten.addmm.default) == 0
    assert _count(gm, torch.ops.aten.mm.default) == 1
    torch.testing.assert_close(gm(*args), _gates(*args))


def _biased_product_into_a_product(bias, x, w, v):
    return torch.addmm(bias, x, w) @ v  # a product is no pointwise use


def _running_sum(acc, x, w):
    return torch.sigmoid(torch.addmm(acc, x, w))  # a (M, N) addend: a running sum, not a bias


@pytest.mark.parametrize(("f", "args"), [
    (_biased_product_into_a_product,
     (_rand(4), _rand(5, 3, seed=1), _rand(3, 4, seed=2), _rand(4, 2, seed=3))),
    (_running_sum, (_rand(5, 4), _rand(5, 3, seed=1), _rand(3, 4, seed=2))),
    (_gates, (_rand(8).bfloat16(), _rand(5, 3, seed=1).bfloat16(), _rand(3, 8, seed=2).bfloat16())),
])
def test_other_biased_products_keep_their_addmm(f, args):
    gm, changed = _unfused(f, *args)
    assert changed == 0 and _count(gm, torch.ops.aten.addmm.default) == 1


@needs_onednn
def test_onednn_weight_gradients_are_stacked_over_their_rows():
    def f(g1, x1, g2, x2):
        return (torch.ops.aligndraw.onednn_weight_grad(g1, x1)
                + torch.ops.aligndraw.onednn_weight_grad(g2, x2))  # (N, K) each

    args = (_rand(70, 96), _rand(70, 80, seed=1), _rand(1, 96, seed=2), _rand(1, 80, seed=3))
    gm, changed = _rewritten(f, *args)
    assert changed == 1 and _count(gm, torch.ops.aligndraw.onednn_weight_grad.default) == 1
    want = args[0].double().T @ args[1].double() + args[2].double().T @ args[3].double()
    torch.testing.assert_close(gm(*args).double(), want, rtol=1e-5, atol=1e-5)


@needs_openblas
def test_openblas_weight_gradients_are_stacked_over_their_rows():
    openblas.load()

    def f(g1, x1, g2, x2):
        return openblas.tmm(g1, x1) + openblas.tmm(g2, x2)  # (N, K) each

    args = (_rand(70, 96), _rand(70, 80, seed=1), _rand(1, 96, seed=2), _rand(1, 80, seed=3))
    gm, changed = _rewritten(f, *args)
    assert changed == 1 and _count(gm, torch.ops.aligndraw_openblas.tmm.default) == 1
    want = args[0].double().T @ args[1].double() + args[2].double().T @ args[3].double()
    torch.testing.assert_close(gm(*args).double(), want, rtol=1e-5, atol=1e-5)


def _eager_and_compiled_grads(monkeypatch, autocast: bool, backend: str = "onednn",
                              batched: str = "aten"):
    """Parameter gradients of a small model, eager and through ``compiler.compile``, how
    many sums the pass rewrote in each compiled graph, the names of the ops a compiled step
    calls, and how many biased products ``unfuse_cpu_bias`` rewrote in each graph. ``batched``
    is the batched products' backend (``aten`` unless a test asks: the default follows the
    processor)."""
    config = tiny_config(lang_hidden=32, align_dim=64, enc_hidden=64, dec_hidden=64, z_dim=64)
    model = AlignDraw(config)
    with torch.no_grad():  # away from the zero init, so that every gradient is informative
        for p in model.parameters():
            p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(1))
    images, tokens, lengths = random_batch(config)
    noise = _rand(4, config.steps, config.z_dim, seed=2)
    changed, unfused = [], []
    stack, unfuse = compiler.stack_products, compiler.unfuse_cpu_bias
    monkeypatch.setattr(compiler, "stack_products",
                        lambda graph, *rest: changed.append(stack(graph, *rest)))
    monkeypatch.setattr(compiler, "unfuse_cpu_bias", lambda graph: unfused.append(unfuse(graph)))
    # caches off, so that the pass runs even where an earlier run compiled this graph
    products = contextlib.nullcontext() if autocast else gemm.using(backend)
    with (products, gemm.using_batched(batched), torch.compiler.config.patch(force_disable_caches=True),
          torch.autocast("cpu", torch.bfloat16, enabled=autocast)):
        want = torch.autograd.grad(model(images, tokens, lengths, noise=noise).loss,
                                   list(model.parameters()))
        torch._dynamo.reset()
        compiled = compiler.compile(model)
        got = torch.autograd.grad(compiled(images, tokens, lengths, noise=noise).loss,
                                  list(model.parameters()))
        with torch.profiler.profile() as prof:  # the ops a compiled step calls, once compiled
            compiled(images, tokens, lengths, noise=noise).loss.backward()
    return want, got, changed, {e.name for e in prof.events()}, unfused


BF16_TOLERANCE = 0.02  # bf16 rounds to 8 bits; eager and compiled sum in other orders (0.008 measured)


@needs_onednn
def test_compiled_model_stacks_its_step_gradients_and_keeps_them_equal(monkeypatch):
    decided = _recording(monkeypatch)
    want, got, changed, ops, _ = _eager_and_compiled_grads(monkeypatch, autocast=False)
    assert True in decided  # step gradients computed in place in their stacks (and still equal)
    # the backward graph: at least the four step-shared weights (projection, encoder input,
    # posterior, z's gates) and the context mix's values
    assert max(changed) >= 5
    # the products call oneDNN's op directly, not the custom op's Python body
    assert "mkldnn::_linear_pointwise" in ops and "aligndraw::onednn_linear" not in ops
    assert relative_distance(got, want) <= 1e-5
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4 * float(e.abs().max()))


@needs_openblas
def test_compiled_model_with_openblas_products_stacks_them_and_equals_eager(monkeypatch):
    want, got, changed, ops, _ = _eager_and_compiled_grads(monkeypatch, autocast=False, backend="openblas")
    assert max(changed) >= 5  # as with oneDNN: the four step-shared weights and the context mix
    assert {"aligndraw_openblas::addmm", "aligndraw_openblas::tmm"} <= ops
    assert relative_distance(got, want) <= 1e-5
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4 * float(e.abs().max()))


@needs_openblas
def test_compiled_model_with_openblas_batched_products_equals_eager(monkeypatch):
    want, got, _, ops, _ = _eager_and_compiled_grads(monkeypatch, autocast=False, batched="openblas")
    # the filterbanks' and the context mix's products, forward and backward, and the canvas
    assert {"aligndraw_openblas::bmm", "aligndraw_openblas::baddbmm"} <= ops
    assert "aten::bmm" not in ops and "aten::baddbmm" not in ops
    assert relative_distance(got, want) <= 1e-5
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4 * float(e.abs().max()))


def _batched_products(a, b, c, c_row, d, row):
    # a bmm, a baddbmm, baddbmms with a broadcast C (1-D, and 3-D with one row), an fp64 bmm,
    # one-row and one-column bmms
    return (a @ b, torch.baddbmm(c, a, b), torch.baddbmm(c_row, a, b),
            torch.baddbmm(c_row.expand(3, 1, 6).contiguous(), a, b), d @ d.transpose(1, 2),
            row @ b, a @ row.transpose(1, 2))


@needs_openblas
def test_cpu_fp32_batched_products_become_openblas_ops():
    openblas.load()  # the ops the pass inserts (once per process)
    args = (_rand(3, 4, 5), _rand(3, 5, 6, seed=1), _rand(3, 4, 6, seed=2), _rand(6, seed=3),
            _rand(3, 2, 2, seed=4).double(), _rand(3, 1, 5, seed=5))
    gm = _traced(_batched_products, *args)
    # not the broadcast C, not the fp64 product, not the one-row or one-column products
    assert compiler.openblas_batched(gm.graph) == 2
    gm.recompile()
    assert _count(gm, torch.ops.aligndraw_openblas.bmm.default) == 1
    assert _count(gm, torch.ops.aligndraw_openblas.baddbmm.default) == 1
    assert _count(gm, torch.ops.aten.baddbmm.default) == 2 and _count(gm, torch.ops.aten.bmm.default) == 3
    for got, want in zip(gm(*args), _batched_products(*args), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_openblas
def test_the_last_pass_follows_the_batched_product_backend(monkeypatch):
    monkeypatch.setattr(gemm, "_tall_transposed", False)  # item 36's pass apart: its own test
    with gemm.using_batched("aten"):
        aten = compiler.LastPasses().uuid()
    with gemm.using_batched("openblas"):
        assert compiler.LastPasses().uuid() != aten  # inductor's cache tells them apart
        monkeypatch.setattr(openblas, "loaded", lambda: False)  # chosen but not loaded: no rewrite
        assert compiler.LastPasses().uuid() == aten


def _tall_and_other_products(a, b, d):
    # a tall bmm (9 × 4 a matrix), a wide one, a one-column one and a tall fp64 one
    return a @ b, b.transpose(1, 2) @ a.transpose(1, 2), a @ b[..., :1], d @ d.transpose(1, 2)[..., :2]


def test_cpu_fp32_tall_batched_products_become_transposed_wide_ones():
    args = (_rand(3, 9, 5), _rand(3, 5, 4, seed=1), _rand(3, 6, 5, seed=2).double())
    gm = _traced(_tall_and_other_products, *args)
    assert compiler.transpose_tall_products(gm.graph) == 1  # not the wide, one-column or fp64 ones
    gm.recompile()
    sizes = [tuple(n.meta["val"].shape[1:]) for n in gm.graph.nodes
             if n.op == "call_function" and n.target is torch.ops.aten.bmm.default]
    assert sorted(sizes) == [(4, 9), (4, 9), (6, 2), (9, 1)]  # the tall fp32 product formed wide
    for got, want in zip(gm(*args), _tall_and_other_products(*args), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_last_pass_keys_whether_tall_products_are_transposed(monkeypatch):
    with gemm.using_batched("aten"):
        monkeypatch.setattr(gemm, "_tall_transposed", False)
        plain = compiler.LastPasses().uuid()
        monkeypatch.setattr(gemm, "_tall_transposed", True)
        assert compiler.LastPasses().uuid() != plain  # inductor's cache tells them apart


def test_compiled_model_with_mkl_products_keeps_its_fp32_step_products_and_equals_eager(monkeypatch):
    stacked = []  # the product op of every group the pass stacks
    stack = compiler._stacked
    monkeypatch.setattr(compiler, "_stacked", lambda graph, terms: (
        stacked.append(compiler._product(terms[0])[0].target), stack(graph, terms))[1])
    transposed, transpose = [], compiler.transpose_tall_products
    monkeypatch.setattr(gemm, "_tall_transposed", True)  # as on an AMD processor
    monkeypatch.setattr(compiler, "transpose_tall_products",
                        lambda graph: transposed.append(transpose(graph)))
    want, got, changed, _, unfused = _eager_and_compiled_grads(monkeypatch, autocast=False,
                                                               backend="aten")
    # the context mix's batched products are stacked, no fp32 mm sum is
    assert torch.ops.aten.bmm.default in stacked and torch.ops.aten.mm.default not in stacked
    # a graph (the backward one) forms each drawing step's tall filterbank gradients (the two
    # reads' F_xᵀ, the write's F̂_yᵀ) as wide products
    assert max(transposed) >= 3 * tiny_config().steps
    # forward: at least the projection of h_dec and the posterior at every step add their bias
    # in a fused kernel; the backward graph has no biased product
    assert max(unfused) >= 2 * tiny_config().steps and min(unfused) == 0
    assert relative_distance(got, want) <= 1e-5
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4 * float(e.abs().max()))


def test_compiled_model_stacks_its_bf16_step_gradients(monkeypatch):
    # under autocast the per-step products are bf16 ``mm``s, which inductor's patterns would
    # fold into addmm chains had the pass run after them (it then rewrote nothing)
    want, got, changed, _, unfused = _eager_and_compiled_grads(monkeypatch, autocast=True)
    assert max(unfused) == 0  # bf16 biases keep their addmm: the pass rewrites fp32 products only
    assert max(changed) >= 4  # projection, encoder input, posterior, z's gates
    assert relative_distance(got, want) <= BF16_TOLERANCE


def _sum_of_mms_and_outer_products(a1, b1, a2, b2, w1, g1, w2, g2):
    return a1 @ b1 + a2 @ b2, _sum_of_outer_products(w1, g1, w2, g2)


def test_with_mkl_products_cpu_fp32_mm_sums_are_left_alone():
    """``cpu_fp32_mm=False`` (the pass's setting while the CPU backend is MKL's): fp32 ``mm``
    sums stay as they are; batched products and bf16 ``mm`` sums are still stacked."""
    args = (_rand(5, 3), _rand(3, 7, seed=1), _rand(5, 4, seed=2), _rand(4, 7, seed=3),
            _rand(4, 6, seed=4), _rand(4, 9, seed=5), _rand(4, 6, seed=6), _rand(4, 9, seed=7))
    gm = _traced(_sum_of_mms_and_outer_products, *args)
    assert compiler.stack_products(gm.graph, cpu_fp32_mm=False) == 1  # the bmm sum only
    gm.recompile()
    assert _count(gm, torch.ops.aten.mm.default) == 2 and _count(gm, torch.ops.aten.bmm.default) == 1
    for got, want in zip(gm(*args), _sum_of_mms_and_outer_products(*args), strict=True):
        torch.testing.assert_close(got, want)
    half = [a.bfloat16() for a in args[:4]]
    gm = _traced(_sum_of_mms, *half, half[0], half[1])
    assert compiler.stack_products(gm.graph, cpu_fp32_mm=False) == 1


def test_the_pass_follows_the_cpu_product_backend():
    with gemm.using("aten"):
        assert not compiler.stacks_cpu_fp32_mm()
        aten = compiler.StackProducts().uuid()
    if openblas.missing() is None:
        with gemm.using("openblas"):
            assert compiler.stacks_cpu_fp32_mm() and compiler.StackProducts().uuid() != aten
    if torch.backends.mkldnn.is_available():
        with gemm.using("onednn"):
            assert compiler.stacks_cpu_fp32_mm()
            onednn = compiler.StackProducts().uuid()
        with gemm.using("aten"):
            assert compiler.StackProducts().uuid() != onednn  # inductor's cache tells them apart


def test_models_on_the_cpu_compile_with_the_cpp_wrapper(monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "compile", lambda model, backend, **kw: seen.append(backend.config) or model)
    model = torch.nn.Linear(3, 2)
    compiler.compile(model)
    compiler.compile(model.forward)
    compiler.compile(lambda x: x * 2)
    compiler.compile(model, cpp_wrapper=False)
    compiler.compile(model, options={"cpp_wrapper": False})  # the caller's options last
    compiler.compile(model, options=None)
    assert [o.get("cpp_wrapper") for o in seen] == [True, True, True, None, False, True]
    assert all(isinstance(o["post_grad_custom_pre_pass"], compiler.StackProducts) for o in seen)
    assert seen[0]["cpp_wrapper_build_separate"]


def test_on_cpu_looks_at_the_modules_parameters():
    model = torch.nn.Linear(3, 2)
    assert compiler.on_cpu(model) and compiler.on_cpu(model.forward) and compiler.on_cpu(len)
    model.to("meta")  # any other device
    assert not compiler.on_cpu(model) and not compiler.on_cpu(model.forward)
    norm = torch.nn.BatchNorm1d(3, affine=False)  # buffers only
    assert compiler.on_cpu(norm) and not compiler.on_cpu(norm.to("meta"))


def test_a_mode_is_passed_as_its_inductor_options_beside_the_graph_pass(monkeypatch):
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: seen.update(kwargs) or model)
    compiler.compile(torch.nn.Linear(2, 2), mode="reduce-overhead")
    # torch.compile would hand a mode beside a backend object to the backend's call: the mode
    # must arrive as its options, in the backend
    assert "mode" not in seen and seen["backend"].config["triton.cudagraphs"] is True
    assert isinstance(seen["backend"], compiler.InductorBackend) and seen["options"] is None
    assert isinstance(seen["backend"].config["post_grad_custom_pre_pass"], compiler.StackProducts)
    compiler.compile(torch.nn.Linear(2, 2), mode="default")
    assert "triton.cudagraphs" not in seen["backend"].config


def _scores_and_grads(compiled, keys2, query2, v):
    """``compiled``'s output and the gradients of its sum for keys2, query2 and v."""
    inputs = [t.clone().requires_grad_() for t in (keys2, query2, v)]
    scores = compiled(*inputs)
    return [scores.detach(), *torch.autograd.grad(scores.sum(), inputs)]


def test_torch_compiles_own_options_go_to_torch_compile_and_the_rest_to_the_backend(monkeypatch):
    filtered = []  # guard_filter_fn is torch.compile's: the backend would refuse it as unknown

    def keep_all(entries):
        filtered.append(len(entries))
        return [True] * len(entries)

    torch._dynamo.reset()
    try:
        double = compiler.compile(lambda x: x * 2, cpp_wrapper=False,
                                  options={"guard_filter_fn": keep_all})
        torch.testing.assert_close(double(torch.ones(3)), torch.full((3,), 2.0))
    finally:
        torch._dynamo.reset()
    assert filtered and filtered[0] > 0
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: seen.update(kwargs) or model)
    compiler.compile(torch.nn.Linear(2, 2), dynamic=False, name="step")
    backend = seen["backend"]
    assert backend.dynamic is False and seen["dynamic"] is False and backend.name == "step"
    assert backend.__name__ == "inductor"  # what torch.compile's wrapper names the compiler
    seen.clear()
    compiler.compile(torch.nn.Linear(2, 2), options={"use_aoti": True})
    assert "backend" not in seen and seen["options"]["use_aoti"] is True  # torch.compile's own


# what turns PyTorch's caches off whatever the library sets (read when PyTorch loads)
CACHES_OFF = {"TORCHINDUCTOR_AUTOGRAD_CACHE_ALLOW_CUSTOM_AUTOGRAD": "0", "TORCHINDUCTOR_AUTOGRAD_CACHE": "0",
              "TORCHINDUCTOR_FX_GRAPH_CACHE": "0", "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}


@pytest.mark.skipif(any(os.environ.get(k) == v for k, v in CACHES_OFF.items()),
                    reason="PyTorch's caches are turned off in this environment")
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_a_warm_compile_loads_the_alignments_graph_from_aotautograds_cache(bf16):
    """Neither the alignment's ``autograd.Function`` nor an autocast region in the graph
    (bf16: ``StepMix`` leaves autocast while it mixes) keeps the graph out of AOTAutograd's
    cache: compiled again after ``torch._dynamo.reset()`` (AOTAutograd's cache is read from
    disk, as a new process reads it), forward and backward load from it instead of being
    traced and partitioned again; and the settings that allow it are on only while
    compiling."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import fresh_cache

    mask = padding_mask(torch.tensor([5, 3, 4]), 5)  # (3, 5): captions of 5, 3 and 4 words

    def scores(keys2, query2, v):  # (B, L, A), (B, A), (A,) → the keys mixed by α: (B, A)
        alpha = alignment.factored_align_weights(keys2, alignment.key_factors(keys2), query2, v, mask)
        return StepMix(keys2)(alpha)

    keys2, query2, v = _rand(3, 5, 8, seed=1), _rand(3, 8, seed=2), _rand(8, seed=3)
    allowed = functorch_config.autograd_cache_allow_custom_autograd_functions
    marked = dict(torch._inductor.config.unsafe_marked_cacheable_functions)
    runs = []
    try:
        with fresh_cache(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            for _ in range(2):
                torch._dynamo.reset()
                counters.clear()
                compiled = compiler.compile(scores, cpp_wrapper=False)
                got = _scores_and_grads(compiled, keys2, query2, v)
                runs.append(dict(counters["aot_autograd"]))
    finally:
        torch._dynamo.reset()  # no compiled code left behind that points into the removed cache
    want = _scores_and_grads(scores, keys2, query2, v)  # eagerly, in fp32
    assert "autograd_cache_bypass" not in runs[0] and runs[0].get("autograd_cache_saved") == 1
    assert runs[1].get("autograd_cache_hit") == 1 and "autograd_cache_miss" not in runs[1]
    for a, e in zip(got, want, strict=True):  # the cached graph computes what the eager one does
        rtol = BF16_TOLERANCE if bf16 else 1e-5  # fp32: other summation orders, other CPUs
        torch.testing.assert_close(a.float(), e, rtol=rtol, atol=rtol * float(e.abs().max()))
    assert functorch_config.autograd_cache_allow_custom_autograd_functions == allowed
    assert torch._inductor.config.unsafe_marked_cacheable_functions == marked


def _three_steps(w, b, h):
    step = StepLinear(w, b)
    for _ in range(3):
        h = torch.tanh(step(h))
    return h.pow(2).sum()


@needs_onednn
@pytest.mark.parametrize("opaque", [True, False])
def test_a_compiled_step_linear_lays_out_its_weight_once(monkeypatch, opaque):
    # the forward layout (column-major) is one op's output; built from a transposed view of a
    # copy instead (opaque=False), inductor copied the weight again before each step's product
    if not opaque:
        monkeypatch.setattr(gemm, "forward_layout", lambda w: w.t().contiguous().t())
    # weights of scale 1/√160, so that tanh does not saturate: a saturated tanh's gradient,
    # 1 − tanh², turns fp32 rounding (another summation order) into large relative differences
    w = (_rand(160, 192) * 160 ** -0.5).requires_grad_()
    b, h = _rand(160, seed=1).requires_grad_(), _rand(8, 160, seed=2).requires_grad_()
    torch._dynamo.reset()
    with gemm.using("onednn"), torch.compiler.config.patch(force_disable_caches=True):
        compiled = torch.compile(lambda w, b, h: _three_steps(w[:, :160], b, h))
        loss, code = run_and_get_code(compiled, w, b, h)
        got = torch.autograd.grad(loss, (w, b, h))
    forward = code[0]
    calls = forward.count("torch.ops.aligndraw.column_major.default(")
    transposing_loops = forward.count("transpose_mxn")
    if opaque:
        assert calls == 1 and transposing_loops == 0
    elif "at::vec::Vectorized" in forward:  # the failure this op avoids: the copy inlined into
        assert transposing_loops >= 3  # kernels, one per product (by 16×16 tiles, vectorised)
    want = torch.autograd.grad(_three_steps(w[:, :160], b, h), (w, b, h))
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5 * float(e.abs().max()))
