import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from aligndraw import gemm, openblas
from aligndraw.model import AlignDraw
from aligndraw.recurrent_linear import StepLinear

from conftest import needs_onednn, needs_openblas, random_batch, tiny_config
from conftest import seeded_randn as _rand


@pytest.fixture(params=[pytest.param("onednn", marks=needs_onednn),
                        pytest.param("openblas", marks=needs_openblas), "aten"])
def backend(request):
    with gemm.using(request.param):
        yield request.param


def _close(got, want):
    # fp32 products in another summation order: rounding-level differences only
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_products_equal_float64_references(backend):
    x, w, b = _rand(100, 96), _rand(130, 96, seed=1), _rand(130, seed=2)
    g, xs = _rand(300, 130, seed=3), _rand(300, 96, seed=4)
    d = torch.float64
    _close(gemm.addmm_t(x, w, b), (x.to(d) @ w.to(d).T + b.to(d)).float())
    _close(gemm.addmm_t(x, w), (x.to(d) @ w.to(d).T).float())
    _close(gemm.mm(g[:100], w), (g[:100].to(d) @ w.to(d)).float())
    _close(gemm.weight_grad(g, xs), (g.to(d).T @ xs.to(d)).float())


def test_strided_operands_give_the_same_products(backend):
    # a column slice (an LSTM's W_ih[:, :Z]), a transposed weight and a 3-D input
    full, x3 = _rand(128, 200), _rand(4, 7, 72, seed=1)
    sliced = full[:, 128:]  # (128, 72), rows 200 apart
    _close(gemm.addmm_t(x3, sliced), x3 @ sliced.contiguous().T)
    transposed = _rand(72, 128, seed=3).T  # (128, 72), column-major
    _close(gemm.addmm_t(x3, transposed), x3 @ transposed.contiguous().T)
    _close(gemm.mm(_rand(5, 72, seed=2), sliced.T), _rand(5, 72, seed=2) @ sliced.T.contiguous())


@needs_onednn
def test_non_dense_layouts_are_packed_before_onednn():
    full = _rand(128, 200)
    assert gemm._dense(full) is full
    assert gemm._dense(full.T).data_ptr() == full.data_ptr()  # column-major: read in place
    packed = gemm._dense(full[:, 128:])
    assert packed.is_contiguous() and torch.equal(packed, full[:, 128:])


def test_linear_gradients_equal_f_linear(backend):
    x = _rand(6, 10, 80).requires_grad_()  # (B, L, K): like the caption's per-word products
    w, b = _rand(96, 80, seed=1).requires_grad_(), _rand(96, seed=2).requires_grad_()
    y = gemm.linear(x, w, b)
    weights = _rand(*y.shape, seed=3)
    got = torch.autograd.grad((y * weights).sum(), (x, w, b))
    want = torch.autograd.grad((F.linear(x, w, b) * weights).sum(), (x, w, b))
    _close(y, F.linear(x, w, b))
    for a, e in zip(got, want, strict=True):
        _close(a, e)


@needs_onednn
def test_onednn_is_used_only_for_large_cpu_fp32_products():
    with gemm.using("onednn"):
        x, w = _rand(4, 64), _rand(64, 64)
        assert gemm.uses_backend(x, w)
        assert not gemm.uses_backend(x, _rand(gemm.MIN_SIZE - 1, 64))  # a small head: default BLAS
        assert not gemm.uses_backend(x.double(), w.double())
        assert not gemm.uses_backend(x.bfloat16(), w.bfloat16())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not gemm.uses_backend(x, w)  # autocast decides the dtype: plain F.linear
            assert gemm.linear(x, w).dtype == torch.bfloat16
    with gemm.using("aten"):
        assert not gemm.uses_backend(x, w)


def test_a_single_vector_and_an_empty_batch(backend):
    w, b = _rand(96, 80, seed=1), _rand(96, seed=2)
    _close(gemm.linear(_rand(80), w, b), F.linear(_rand(80), w, b))
    assert gemm.linear(torch.zeros(0, 80), w, b).shape == (0, 96)
    assert gemm.addmm_t(torch.zeros(0, 7, 80), w).shape == (0, 7, 96)


@needs_onednn
def test_same_inputs_same_bits():
    with gemm.using("onednn"):
        x, w = _rand(100, 300), _rand(1200, 300, seed=1)
        assert torch.equal(gemm.addmm_t(x, w), gemm.addmm_t(x.clone(), w.clone()))


def test_backend_names_are_checked(monkeypatch):
    with pytest.raises(ValueError, match="one of onednn, openblas, aten.*got 'mkl'"):
        gemm.set_backend("mkl")
    monkeypatch.setenv("ALIGNDRAW_CPU_GEMM", "blas")
    with pytest.raises(ValueError, match="ALIGNDRAW_CPU_GEMM"):
        gemm._default_backend()
    monkeypatch.setenv("ALIGNDRAW_CPU_GEMM", " ATen ")
    assert gemm._default_backend() == "aten"
    before = gemm.backend()
    with gemm.using("aten"):
        assert gemm.backend() == "aten"
    assert gemm.backend() == before


def test_the_default_backend_follows_the_processor(monkeypatch):
    monkeypatch.delenv("ALIGNDRAW_CPU_GEMM", raising=False)
    avx512, avx2 = frozenset({"avx2", "avx512f"}), frozenset({"avx2", "fma"})
    assert gemm._default_backend("GenuineIntel", avx512) == "aten"
    assert gemm._default_backend("GenuineIntel", avx2) == "aten"
    onednn = "onednn" if torch.backends.mkldnn.is_available() else "aten"
    assert gemm._default_backend("AuthenticAMD", avx512) == onednn
    assert gemm._default_backend("", avx512) == onednn
    # AVX2-only AMD (Zen 3): OpenBLAS where it can be built, else MKL (faster than oneDNN there)
    buildable = "openblas" if openblas.missing() is None else "aten"
    assert gemm._default_backend("AuthenticAMD", avx2) == buildable
    assert gemm._default_backend("", avx2) == "aten"  # vendor unknown: not measured, MKL
    assert gemm._default_backend("", frozenset()) == "aten"  # flags unknown (e.g. ARM)
    monkeypatch.setattr(openblas, "missing", lambda: "no C++ compiler")
    assert gemm._default_backend("AuthenticAMD", avx2) == "aten"
    if torch.backends.mkldnn.is_available():
        monkeypatch.setenv("ALIGNDRAW_CPU_GEMM", "onednn")
        assert gemm._default_backend("GenuineIntel", avx2) == "onednn"  # the environment decides first


def test_cpu_flags_are_read_from_cpuinfo():
    flags = gemm.cpu_flags()
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), None)
    assert flags == (frozenset(line.split(":", 1)[1].split()) if line else frozenset())


def test_cpu_vendor_is_read_from_cpuinfo():
    vendor = gemm.cpu_vendor()
    assert isinstance(vendor, str)
    if Path("/proc/cpuinfo").is_file() and "vendor_id" in Path("/proc/cpuinfo").read_text():
        assert vendor and vendor in Path("/proc/cpuinfo").read_text()


def test_step_linear_in_fp32_equals_float64_autograd(backend):
    # the fp32 products of a recurrence with a column-sliced weight, as the model builds them
    g = torch.Generator().manual_seed(0)
    full = (0.1 * torch.randn(96, 160, generator=g, dtype=torch.float64)).requires_grad_()
    bias = torch.randn(96, generator=g, dtype=torch.float64).requires_grad_()
    h0 = torch.randn(8, 96, generator=g, dtype=torch.float64).requires_grad_()

    def loss(step, h):
        total = 0.0
        for t in range(4):
            h = torch.tanh(step(h))
            total = total + (t + 1) * h.double().pow(2).sum()
        return total

    leaves = (full, bias, h0)
    want = torch.autograd.grad(loss(lambda h: F.linear(h, full[:, 64:], bias), h0), leaves)
    f32 = [t.detach().float().requires_grad_() for t in leaves]
    step = StepLinear(f32[0][:, 64:], f32[1])
    got = torch.autograd.grad(loss(step, f32[2]), f32)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-5 * float(e.abs().max()))


def test_compiled_linear_equals_eager(backend):
    x = _rand(16, 96).requires_grad_()
    w, b = _rand(128, 96, seed=1).requires_grad_(), _rand(128, seed=2).requires_grad_()

    def f(x, w, b):
        return torch.tanh(gemm.linear(x, w, b)).pow(2).sum()

    torch._dynamo.reset()
    with gemm.using(backend):
        want = torch.autograd.grad(f(x, w, b), (x, w, b))
        got = torch.autograd.grad(torch.compile(f, fullgraph=True)(x, w, b), (x, w, b))
    for a, e in zip(got, want, strict=True):
        _close(a, e)


class _BackendCalls(TorchDispatchMode):
    """Counts the products each backend's own op computed (OpenBLAS's batched ones apart, as
    "batched"), and the strides of every oneDNN product's weight operand."""

    def __init__(self):
        super().__init__()
        self.counts = dict.fromkeys((*gemm.BACKENDS, "batched"), 0)
        self.strides = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.mkldnn._linear_pointwise.default:
            self.counts["onednn"] += 1
            self.strides.append(args[1].stride())
        elif func.namespace == "aligndraw_openblas":
            self.counts["batched" if func.__name__.split(".")[0] in ("bmm", "baddbmm") else "openblas"] += 1
        elif func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            self.counts["aten"] += 1
        return func(*args, **(kwargs or {}))


def test_the_model_runs_its_products_through_the_chosen_backend(backend):
    config = tiny_config(lang_hidden=32, align_dim=64, enc_hidden=64, dec_hidden=64, z_dim=64)
    model = AlignDraw(config)
    images, tokens, lengths = random_batch(config)
    noise = torch.randn(4, config.steps, config.z_dim, generator=torch.Generator().manual_seed(0))
    losses, grads, counts = {}, {}, {}
    for name in dict.fromkeys((backend, "aten")):
        with gemm.using(name), gemm.using_batched("aten"), _BackendCalls() as calls:
            losses[name] = model(images, tokens, lengths, noise=noise).loss
            grads[name] = torch.autograd.grad(losses[name], list(model.parameters()))
            model.sample(tokens, lengths, noise=noise, history=False)
        counts[name] = calls.counts
    assert counts[backend]["batched"] == 0
    if backend == "aten":
        assert counts["aten"]["onednn"] == counts["aten"]["openblas"] == 0
        return
    # per drawing step at least the projection, the encoder input, the posterior and z's gates
    # forward, and their input gradients, in training; the projection and z's gates sampling
    assert counts[backend][backend] >= (4 + 4 + 2) * config.steps
    assert counts["aten"]["onednn"] == counts["aten"]["openblas"] == 0
    _close(losses[backend], losses["aten"])
    flat = {name: torch.cat([g.flatten() for g in grads[name]]) for name in grads}
    # all gradients as one vector (at this init some are rounding noise on their own; the
    # per-parameter check against the naive model, perturbed weights, is the "wide" config of
    # tests/test_benchmarks.py)
    assert (flat[backend] - flat["aten"]).norm() <= 1e-5 * flat["aten"].norm()


def test_bf16_warning_only_on_cpus_without_native_bf16_products(monkeypatch):
    monkeypatch.setattr(gemm, "cpu_bf16_native", lambda: False)
    why = gemm.bf16_warning("cpu")
    assert "no native bf16 matrix products" in why and "fp32" in why
    assert gemm.bf16_warning(torch.device("cuda")) is None  # not a CPU: oneDNN is not asked
    monkeypatch.setattr(gemm, "cpu_bf16_native", lambda: True)
    assert gemm.bf16_warning("cpu") is None


def test_cpu_bf16_native_agrees_with_the_processor_flags():
    flags = set()
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    if flags:  # x86 Linux: oneDNN has bf16 kernels exactly with AVX-512 BW, VL and DQ (AMX
        # processors have them too); an AVX2-only processor gets the scalar fallback
        assert gemm.cpu_bf16_native() == ({"avx512bw", "avx512vl", "avx512dq"} <= flags)
    else:  # no x86 flags to compare with (e.g. ARM): at least the answer is oneDNN's
        assert gemm.cpu_bf16_native() == (torch.backends.mkldnn.is_available()
                                          and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def test_the_default_batched_backend_follows_the_processor(monkeypatch):
    monkeypatch.delenv("ALIGNDRAW_CPU_BMM", raising=False)
    avx512, avx2 = frozenset({"avx2", "avx512f"}), frozenset({"avx2", "fma"})
    monkeypatch.setattr(openblas, "missing", lambda: None)  # buildable, whatever this machine has
    assert gemm._default_batched_backend("AuthenticAMD", avx512) == "openblas"
    assert gemm._default_batched_backend("AuthenticAMD", avx2) == "aten"  # Zen 3: item 34
    assert gemm._default_batched_backend("GenuineIntel", avx512) == "aten"
    assert gemm._default_batched_backend("", avx512) == "aten"
    assert gemm._default_batched_backend("AuthenticAMD", frozenset()) == "aten"  # flags unknown
    monkeypatch.setenv("ALIGNDRAW_CPU_BMM", " ATen ")
    assert gemm._default_batched_backend("AuthenticAMD", avx512) == "aten"  # the environment decides first
    monkeypatch.setenv("ALIGNDRAW_CPU_BMM", "openblas")
    assert gemm._default_batched_backend("AuthenticAMD", avx2) == "openblas"  # asked for: any CPU
    monkeypatch.delenv("ALIGNDRAW_CPU_BMM")
    monkeypatch.setattr(openblas, "missing", lambda: "no ninja")
    assert gemm._default_batched_backend("AuthenticAMD", avx512) == "aten"
    monkeypatch.setenv("ALIGNDRAW_CPU_BMM", "mkl")
    with pytest.raises(ValueError, match="batched-product backend must be one of openblas, aten.*"
                                         "ALIGNDRAW_CPU_BMM.*got 'mkl'"):
        gemm._default_batched_backend()
    monkeypatch.setenv("ALIGNDRAW_CPU_BMM", "openblas")
    monkeypatch.setattr(openblas, "loaded", lambda: False)
    with pytest.raises(ValueError, match="'openblas' asked for, but no ninja; use 'aten'"):
        gemm._default_batched_backend()
    before = gemm.batched_backend()
    with gemm.using_batched("aten"):
        assert gemm.batched_backend() == "aten"
    assert gemm.batched_backend() == before


def test_forward_layout_is_column_major_where_onednn_multiplies(backend):
    full = _rand(128, 160)
    weight = full[:, 64:]  # a column slice, as the model's weights often are
    laid = gemm.forward_layout(weight)
    assert torch.equal(laid, weight)
    if backend == "onednn":
        assert laid.stride() == (1, 128)  # (N, K) with N contiguous
    else:
        assert laid.is_contiguous()
    assert gemm.forward_layout(_rand(32, 96)).is_contiguous()  # a side under MIN_SIZE: as for F.linear
    with torch.autocast("cpu", torch.bfloat16):  # autocast: not oneDNN's fp32 products
        assert gemm.forward_layout(weight).is_contiguous()


@needs_onednn
def test_step_linear_gives_onednn_every_weight_with_its_output_axis_contiguous():
    # the layout oneDNN reads fastest: forward products read the column-major copy, input
    # gradients the row-major one (transposed), weight gradients gᵀ
    w, b = _rand(128, 96).requires_grad_(), _rand(128, seed=1).requires_grad_()
    h = _rand(40, 96, seed=2).requires_grad_()  # 2 steps · 40 rows: the weight gradient's R ≥ MIN_SIZE
    with gemm.using("onednn"), _BackendCalls() as seen:
        step = StepLinear(w, b)
        assert step.weight.stride() == (1, 128) and step.backward_weight.stride() == (96, 1)
        out = step(torch.tanh(step(h)[:, :96]))
        out.pow(2).sum().backward()
    assert len(seen.strides) >= 5  # two forward, two input gradients, one weight gradient
    assert all(s[0] == 1 for s in seen.strides), seen.strides
    with gemm.using("onednn"), torch.no_grad():  # no gradients: the forward layout only
        plain = StepLinear(w, b)
    assert plain.weight.stride() == (1, 128) and plain.backward_weight is None


def test_linear_with_a_forward_layout_and_a_backward_weight_equals_f_linear(backend):
    # the input gradient reads backward_weight where it is given, else the forward layout
    w, b = _rand(128, 96).requires_grad_(), _rand(128, seed=1).requires_grad_()
    h = _rand(16, 96, seed=2).requires_grad_()
    want = torch.autograd.grad(torch.tanh(F.linear(h, w, b)).pow(2).sum(), (w, b, h))
    for backward_weight in (None, w.contiguous()):
        with _BackendCalls() as seen:
            y = gemm.linear(h, gemm.forward_layout(w), b, backward_weight)
            got = torch.autograd.grad(torch.tanh(y).pow(2).sum(), (w, b, h))
        for a, e in zip(got, want, strict=True):
            _close(a, e)
        if backend == "onednn":  # forward, input gradient (16 rows: no weight gradient by oneDNN)
            assert len(seen.strides) == 2
            # the input gradient reads the row-major copy transposed, else the forward layout's
            assert (seen.strides[1][0] == 1) == (backward_weight is not None), seen.strides


@needs_onednn
def test_compiled_forward_layout_gives_the_eager_layout():
    w = _rand(128, 96)  # not square: the op's fake must give (N, K) with strides (1, N)
    torch._dynamo.reset()
    with gemm.using("onednn"):
        laid = torch.compile(gemm.forward_layout, fullgraph=True)(w)
    assert laid.shape == (128, 96) and laid.stride() == (1, 128) and torch.equal(laid, w)


def _with_grads(fn, *tensors, weights):
    """fn(*tensors) and the gradients of Σ weights·fn(*tensors) with respect to each tensor."""
    leaves = [t.detach().requires_grad_() for t in tensors]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, leaves, weights)


@needs_openblas
@pytest.mark.parametrize("channels", [1, 3])
def test_eager_batched_products_equal_float64_with_gradients_through_openblas(channels):
    # the read's shapes: (B, 1, N, H) @ (B, C, H, W), then @ (B, 1, W, N), the second a
    # transposed view; with three channels the filterbank is broadcast, a copy autograd sums
    f_y, images, f_x = _rand(5, 1, 8, 20), _rand(5, channels, 20, 24, seed=1), _rand(5, 1, 8, 24, seed=2)
    canvas, left, right = _rand(5, 20, 24, seed=3), _rand(5, 20, 8, seed=4), _rand(5, 8, 24, seed=5)

    def read(f_y, images, f_x):
        return gemm.matmul(gemm.matmul(f_y, images), f_x.transpose(-1, -2))

    weights = _rand(5, channels, 8, 8, seed=6)
    with gemm.using_batched("openblas"), _BackendCalls() as calls:
        got, got_grads = _with_grads(read, f_y, images, f_x, weights=weights)
        got_add, got_add_grads = _with_grads(gemm.baddbmm, canvas, left, right, weights=images[:, 0])
    assert calls.counts["batched"] == 2 + 4 + 1 + 2  # forward, gradients; baddbmm and its two
    d = torch.float64
    want, want_grads = _with_grads(read, f_y.to(d), images.to(d), f_x.to(d), weights=weights.to(d))
    want_add, want_add_grads = _with_grads(torch.baddbmm, canvas.to(d), left.to(d), right.to(d),
                                           weights=images[:, 0].to(d))
    for a, b in zip((got, *got_grads, got_add, *got_add_grads),
                    (want, *want_grads, want_add, *want_add_grads), strict=True):
        assert a.dtype == torch.float32 and a.shape == b.shape
        _close(a, b.float())


@needs_openblas
def test_eager_batched_products_stay_pytorchs_where_openblas_does_not_apply(monkeypatch):
    a, b = _rand(4, 6, 5), _rand(4, 5, 7, seed=1)
    with gemm.using_batched("openblas"), _BackendCalls() as calls:
        with monkeypatch.context() as tracing:  # traced, the compiler's pass moves the products
            tracing.setattr(torch.compiler, "is_compiling", lambda: True)
            gemm.matmul(a, b)
            gemm.baddbmm(_rand(4, 6, 7), a, b)
        gemm.matmul(a[:, :1], b)  # one row a matrix (the context mix's α_t-weighted sum)
        gemm.matmul(a, b[..., :1])  # one column
        gemm.matmul(a.double(), b.double())  # not fp32
        gemm.matmul(a[0], b[0])  # two dimensions
        gemm.baddbmm(_rand(1, 6, 7), a, b)  # a broadcast C
        gemm.baddbmm(_rand(4, 1, 7), a[:, :1], b)  # one row a matrix, as in matmul
        with torch.autocast("cpu", dtype=torch.bfloat16):
            gemm.matmul(a, b)
        assert calls.counts["batched"] == 0
        gemm.matmul(a[:, :, :0], b[:, :0])  # empty
        gemm.baddbmm(_rand(4, 6, 7), a[:, :, :0], b[:, :0])
        assert calls.counts["batched"] == 0
        gemm.matmul(a, b)
        assert calls.counts["batched"] == 1
    with gemm.using_batched("aten"), _BackendCalls() as calls:
        gemm.matmul(a, b), gemm.bmm(a, b), gemm.baddbmm(_rand(4, 6, 7), a, b)
    assert calls.counts["batched"] == 0


@needs_openblas
@pytest.mark.parametrize("wanted", [0, 1])
def test_eager_batched_product_gradients_for_one_operand(wanted):
    # autograd asks only for the gradients it needs (the images need none)
    a, b = _rand(3, 5, 4), _rand(3, 4, 6, seed=1)
    leaves = [a.clone(), b.clone()]
    leaves[wanted].requires_grad_()
    with gemm.using_batched("openblas"), _BackendCalls() as calls:
        (grad,) = torch.autograd.grad(gemm.bmm(*leaves).sum(), leaves[wanted])
    assert calls.counts["batched"] == 2  # the product and the one gradient
    (want,) = torch.autograd.grad((leaves[0].double() @ leaves[1].double()).sum(), leaves[wanted])
    _close(grad, want.float())


def test_a_default_batched_openblas_that_fails_to_build_leaves_eager_products_to_pytorch(monkeypatch,
                                                                                         caplog):
    def fail():
        raise RuntimeError("the build failed")

    monkeypatch.setattr(openblas, "loaded", lambda: False)
    monkeypatch.setattr(openblas, "load", fail)
    monkeypatch.setattr(gemm, "_backend", "onednn")
    monkeypatch.setattr(gemm, "_batched", "openblas")
    monkeypatch.setattr(gemm, "_batched_asked", False)
    a, b = _rand(3, 5, 4), _rand(3, 4, 6, seed=1)
    with caplog.at_level(logging.WARNING, logger="aligndraw.gemm"):
        torch.testing.assert_close(gemm.matmul(a, b), torch.bmm(a, b))
    assert gemm.batched_backend() == "aten" and "the build failed" in caplog.text


@needs_openblas
def test_the_eager_model_runs_its_batched_products_through_openblas():
    config = tiny_config(lang_hidden=32, align_dim=64, enc_hidden=64, dec_hidden=64, z_dim=64)
    model = AlignDraw(config)
    images, tokens, lengths = random_batch(config)
    noise = torch.randn(4, config.steps, config.z_dim, generator=torch.Generator().manual_seed(0))
    losses, grads, counts = {}, {}, {}
    for name in ("openblas", "aten"):
        with gemm.using("aten"), gemm.using_batched(name), _BackendCalls() as calls:
            losses[name] = model(images, tokens, lengths, noise=noise).loss
            grads[name] = torch.autograd.grad(losses[name], list(model.parameters()))
            training = calls.counts["batched"]
            model.sample(tokens, lengths, noise=noise, history=False)
        counts[name] = (training, calls.counts["batched"] - training)
    # per drawing step: the two glimpses' four products and seven gradients (the images need
    # none), the write's two products and four gradients; per word, the caption encoder's
    # recurrent product and its two gradients; the context mix's stacked gradient once
    words = tokens.shape[1]
    assert counts["openblas"][0] == (4 + 7 + 2 + 4) * config.steps + 3 * words + 1
    assert counts["openblas"][1] == 2 + words  # sampling without history: the writes' two products
    assert counts["aten"] == (0, 0)
    _close(losses["openblas"], losses["aten"])
    flat = {name: torch.cat([g.flatten() for g in grads[name]]) for name in grads}
    assert (flat["openblas"] - flat["aten"]).norm() <= 1e-5 * flat["aten"].norm()


@pytest.mark.parametrize("shape", [(3, 9, 5, 4), (3, 4, 5, 9), (3, 6, 5, 6), (3, 9, 5, 1), (3, 1, 5, 9)])
def test_tall_bmm_equals_float64_and_forms_tall_results_transposed(shape):
    p, m, k, n = shape
    a, b = _rand(p, m, k), _rand(p, k, n, seed=1)
    got = gemm.tall_bmm(a, b)
    _close(got, (a.double() @ b.double()).float())
    # a tall result (M > N > 1) is a transposed view of the wide product; the others row-major
    assert got.stride() == ((m * n, 1, m) if m > n > 1 else (m * n, n, 1))


def test_tall_products_are_transposed_where_pytorch_runs_the_batched_products_on_amd(monkeypatch):
    with gemm.using_batched("aten"):
        monkeypatch.setattr(gemm, "_tall_transposed", True)  # as on an AMD processor
        assert gemm.transposes_tall_products()
        monkeypatch.setattr(gemm, "_tall_transposed", False)  # any other vendor
        assert not gemm.transposes_tall_products()


@needs_openblas
def test_tall_products_are_left_to_openblas_where_it_runs_the_batched_products(monkeypatch):
    monkeypatch.setattr(gemm, "_tall_transposed", True)
    with gemm.using_batched("openblas"):
        assert not gemm.transposes_tall_products()  # OpenBLAS runs the tall form as fast
