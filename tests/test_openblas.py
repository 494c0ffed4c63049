import ctypes
import logging

import pytest
import torch

from aligndraw import gemm, openblas

from conftest import seeded_randn as _rand

needs_openblas = pytest.mark.skipif(openblas.missing() is not None,
                                    reason=f"OpenBLAS products cannot be built here: {openblas.missing()}")


@pytest.fixture(scope="module", autouse=True)
def _loaded():
    if openblas.missing() is None:
        openblas.load()


def _f64(a, b, bias=None):
    out = a.double() @ b.double()
    return (out if bias is None else out + bias.double()).float()


def _close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(1.0, float(want.abs().max())))


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``t`` (rows, cols) in another memory layout."""
    if layout == "column-major":
        return t.T.contiguous().T  # strides (1, rows)
    if layout == "column-slice":  # rows further apart than the row is long (W_ih[:, :Z])
        wide = torch.zeros(t.shape[0], t.shape[1] + 9)
        wide[:, 3:3 + t.shape[1]] = t
        return wide[:, 3:3 + t.shape[1]]
    if layout == "every-other-column":  # neither row- nor column-major: packed first
        wide = torch.zeros(t.shape[0], 2 * t.shape[1])
        wide[:, ::2] = t
        return wide[:, ::2]
    return t


LAYOUTS = ("row-major", "column-major", "column-slice", "every-other-column")


@needs_openblas
def test_numpys_openblas_is_found_with_its_symbols():
    path = openblas.numpy_openblas()
    assert path is not None and path.is_file() and "openblas" in path.name.lower()
    sgemm, ilp64, local = openblas._symbols(path)
    assert sgemm and local and isinstance(ilp64, bool)
    assert openblas.loaded()


@needs_openblas
@pytest.mark.parametrize("layout_a", LAYOUTS)
@pytest.mark.parametrize("layout_b", LAYOUTS)
def test_products_equal_float64_in_every_layout(layout_a, layout_b):
    a, b, bias = _rand(100, 96), _rand(96, 723, seed=1), _rand(723, seed=2)
    a2, b2 = _layout(a, layout_a), _layout(b, layout_b)
    _close(openblas.mm(a2, b2), _f64(a, b))
    _close(openblas.addmm(bias, a2, b2), _f64(a, b, bias))
    _close(openblas.tmm(_layout(a.T.contiguous(), layout_a), b2[:, :130]), _f64(a, b[:, :130]))


@needs_openblas
@pytest.mark.parametrize("m,n", [(1, 723), (3, 5), (100, 64), (100, 130), (7, 3286)])
@pytest.mark.parametrize("threads", [1, 2])
def test_every_size_and_thread_count(m, n, threads):
    # one output column block per thread, at least 64 columns each: 5 and 64 columns run on
    # one thread, 130 and more are split
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b, bias = _rand(m, 80), _rand(80, n, seed=1), _rand(n, seed=2)
        _close(openblas.addmm(bias, a, b), _f64(a, b, bias))
        _close(openblas.mm(a, b), _f64(a, b))
    finally:
        torch.set_num_threads(before)


@needs_openblas
def test_the_bias_is_never_written():
    # a one-row product's output must not be a view of the bias (sgemm adds into its output)
    bias = _rand(723, seed=2)
    kept = bias.clone()
    for rows in (1, 4):
        out = openblas.addmm(bias, _rand(rows, 64), _rand(64, 723, seed=1))
        assert out.data_ptr() != bias.data_ptr()
    assert torch.equal(bias, kept)


@needs_openblas
def test_empty_sides():
    bias = _rand(7, seed=2)
    assert openblas.mm(torch.zeros(0, 5), torch.zeros(5, 7)).shape == (0, 7)
    assert openblas.mm(torch.zeros(3, 5), torch.zeros(5, 0)).shape == (3, 0)
    assert torch.equal(openblas.mm(torch.ones(3, 0), torch.ones(0, 7)), torch.zeros(3, 7))
    assert torch.equal(openblas.addmm(bias, torch.ones(3, 0), torch.ones(0, 7)), bias.expand(3, 7))


@needs_openblas
def test_bad_operands_are_refused_with_a_message():
    with pytest.raises(RuntimeError, match=r"CPU float32 tensor, got Double"):
        openblas.mm(torch.ones(2, 3, dtype=torch.float64), torch.ones(3, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"\(M, K\) and \(K, N\) matrices, got \[2, 3\] and \[4, 4\]"):
        openblas.mm(torch.ones(2, 3), torch.ones(4, 4))
    with pytest.raises(RuntimeError, match=r"bias must be \(4\), got \[5\]"):
        openblas.addmm(torch.ones(5), torch.ones(2, 3), torch.ones(3, 4))


@needs_openblas
def test_openblas_is_left_with_its_own_thread_setting():
    # each product sets OpenBLAS to one thread on the threads that call it, and puts the old
    # setting back: numpy's own products on those threads keep theirs
    lib = ctypes.CDLL(str(openblas.numpy_openblas()))
    local = getattr(lib, next(n for n in openblas.THREADS_LOCAL_SYMBOLS if hasattr(lib, n)))
    local.restype, local.argtypes = ctypes.c_int, [ctypes.c_int]
    before = local(3)  # this thread's setting, now 3
    try:
        openblas.mm(_rand(100, 96), _rand(96, 723, seed=1))
        assert local(before) == 3
    finally:
        local(before)


@needs_openblas
def test_the_ops_trace_under_compile():
    def f(bias, a, b):
        return torch.tanh(openblas.addmm(bias, a, b)) + openblas.tmm(a.T.contiguous(), b).sum()

    args = (_rand(130, seed=2), _rand(6, 96), _rand(96, 130, seed=1))
    torch._dynamo.reset()
    _close(torch.compile(f, fullgraph=True)(*args), f(*args))


def test_missing_says_what_is_missing(monkeypatch):
    monkeypatch.setattr(openblas, "numpy_openblas", lambda: None)
    assert "numpy carries no OpenBLAS" in openblas.missing()
    with pytest.raises(ValueError, match="'openblas' asked for, but numpy carries no OpenBLAS.*use 'aten'"):
        gemm.set_backend("openblas")
    monkeypatch.setattr(openblas, "numpy_openblas", lambda: openblas.Path("/any/libopenblas.so"))
    monkeypatch.setattr(openblas.shutil, "which", lambda name: None)
    assert "no C++ compiler" in openblas.missing()


def _unbuildable(monkeypatch):
    def fail():
        raise RuntimeError("the build failed")

    monkeypatch.setattr(openblas, "loaded", lambda: False)
    monkeypatch.setattr(openblas, "load", fail)
    monkeypatch.setattr(gemm, "_backend", "openblas")


def test_a_default_openblas_that_fails_to_build_falls_back_to_aten(monkeypatch, caplog):
    _unbuildable(monkeypatch)
    monkeypatch.setattr(gemm, "_asked", False)
    with caplog.at_level(logging.WARNING, logger="aligndraw.gemm"):
        assert gemm.prepare() == "aten"
    assert gemm.backend() == "aten" and "the build failed" in caplog.text
    x, w = _rand(4, 96), _rand(130, 96, seed=1)
    _close(gemm.linear(x, w), _f64(x, w.T))


def test_an_asked_for_openblas_that_fails_to_build_is_an_error(monkeypatch):
    _unbuildable(monkeypatch)
    monkeypatch.setattr(gemm, "_asked", True)
    with pytest.raises(RuntimeError, match="'openblas': the build failed"):
        gemm.prepare()
    assert gemm.backend() == "openblas"
