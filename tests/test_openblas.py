import logging
import os
import subprocess
import sys

import pytest
import torch

from aligndraw import extensions, gemm, openblas

from conftest import needs_avx2, needs_openblas, torch_threads
from conftest import seeded_randn as _rand


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
    if layout == "transposed-slice":  # a column slice's transpose (W[:, :Z].T): columns apart
        wide = torch.zeros(t.shape[1], t.shape[0] + 9)
        wide[:, 3:3 + t.shape[0]] = t.T
        return wide[:, 3:3 + t.shape[0]].T  # strides (1, rows + 9)
    if layout == "every-other-column":  # neither row- nor column-major: packed first
        wide = torch.zeros(t.shape[0], 2 * t.shape[1])
        wide[:, ::2] = t
        return wide[:, ::2]
    return t


LAYOUTS = ("row-major", "column-major", "column-slice", "transposed-slice", "every-other-column")


@needs_openblas
def test_numpys_openblas_is_found_with_its_symbols():
    path = openblas.numpy_openblas()
    assert path is not None and path.is_file() and "openblas" in path.name.lower()
    sgemm, ilp64 = openblas._symbols(path)
    assert sgemm and isinstance(ilp64, bool)
    assert openblas.loaded()


@needs_openblas
@pytest.mark.parametrize("layout_a", LAYOUTS)
@pytest.mark.parametrize("layout_b", LAYOUTS)
def test_products_equal_float64_in_every_layout(layout_a, layout_b):
    a, b, bias = _rand(100, 96), _rand(96, 723, seed=1), _rand(723, seed=2)
    a2, b2 = _layout(a, layout_a), _layout(b, layout_b)
    tall, wide = _rand(96, 723, seed=3), _layout(a.T.contiguous(), layout_b)  # (96, 723), (96, 100)
    with torch_threads(2):  # wide outputs split by columns, tall ones by rows, on any machine
        _close(openblas.mm(a2, b2), _f64(a, b))
        _close(openblas.addmm(bias, a2, b2), _f64(a, b, bias))
        _close(openblas.tmm(_layout(a.T.contiguous(), layout_a), b2[:, :130]), _f64(a, b[:, :130]))
        _close(openblas.tmm(_layout(tall, layout_a), wide), _f64(tall.T, a.T))  # a weight gradient's shape
        _close(openblas.addmm(bias[:100], _layout(tall.T.contiguous(), layout_a), wide),
               _f64(tall.T, a.T, bias[:100]))


@needs_openblas
@pytest.mark.parametrize("m,k,n", [(1, 80, 723), (3, 80, 5), (100, 80, 64), (100, 80, 130),
                                   (7, 80, 3286), (5, 1, 300), (300, 80, 1), (1, 1, 1),
                                   (723, 80, 100), (130, 80, 7), (330, 80, 300)])
@pytest.mark.parametrize("threads", [1, 2, 3, 5])
def test_every_size_and_thread_count(m, k, n, threads):
    # one output block of the longer side (rows if M > N, else columns) per thread, at least 64
    # rows or columns each, starting at multiples of 16: fewer than 128 run on one thread, 130
    # and more are split
    a, b, bias = _rand(m, k), _rand(k, n, seed=1), _rand(n, seed=2)
    with torch_threads(threads):
        _close(openblas.addmm(bias, a, b), _f64(a, b, bias))
        _close(openblas.mm(a, b), _f64(a, b))
        _close(openblas.mm(a.T.contiguous().T, b.T.contiguous().T), _f64(a, b))  # both transposed


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
def test_loading_sets_openblas_to_one_thread():
    # the op's threads are PyTorch's: OpenBLAS's own pool (its default is one thread per core)
    # would spin beside them
    assert openblas.threads() == 1


@needs_openblas
def test_the_ops_trace_under_compile():
    def f(bias, a, b):
        return torch.tanh(openblas.addmm(bias, a, b)) + openblas.tmm(a.T.contiguous(), b).sum()

    args = (_rand(130, seed=2), _rand(6, 96), _rand(96, 130, seed=1))
    torch._dynamo.reset()
    _close(torch.compile(f, fullgraph=True)(*args), f(*args))


@pytest.mark.skipif(openblas.numpy_openblas() is None, reason="numpy carries no OpenBLAS here")
@needs_avx2
@pytest.mark.parametrize("core", ["Haswell", "Sandybridge"])
def test_corename_names_the_kernels_openblas_coretype_forces(core):
    # Sandybridge: kernels no processor with AVX2 picks by itself, so the name is the variable's
    code = "from aligndraw import openblas; print(openblas.corename())"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=os.environ | {"OPENBLAS_CORETYPE": core})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == core


def test_corename_is_none_without_an_openblas_to_ask(tmp_path):
    assert openblas.corename(tmp_path / "libopenblas-missing.so") is None


def test_narrowed_core_warning_only_where_the_environment_took_avx512_away():
    avx512, avx2 = frozenset({"avx2", "avx512f"}), frozenset({"avx2"})
    why = openblas.narrowed_core_warning("Haswell", "Haswell", avx512)
    assert "OPENBLAS_CORETYPE=Haswell" in why and "Haswell kernels" in why and "SkylakeX" in why
    assert openblas.narrowed_core_warning("Zen", "zen", avx512) is not None
    assert openblas.narrowed_core_warning("Haswell", None, avx512) is None  # OpenBLAS's own choice
    assert openblas.narrowed_core_warning("Haswell", "", avx512) is None  # blank: as if unset
    assert openblas.narrowed_core_warning("SkylakeX", "skylakex", avx512) is None
    assert openblas.narrowed_core_warning("Cooperlake", "Cooperlake", avx512) is None
    assert openblas.narrowed_core_warning("Haswell", "Haswell", avx2) is None  # nothing wider here
    assert openblas.narrowed_core_warning(None, "Haswell", avx512) is None  # kernels unknown


def _narrowed(monkeypatch) -> list[bool]:
    """OpenBLAS not loaded yet, its load recorded in the list returned, and its kernels
    narrowed by the environment on an AVX-512 processor."""
    loaded = []
    monkeypatch.setattr(openblas, "loaded", lambda: bool(loaded))
    monkeypatch.setattr(openblas, "load", lambda: loaded.append(True))
    monkeypatch.setattr(openblas, "corename", lambda: "Haswell")
    monkeypatch.setattr(gemm, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    for var, value in (("_backend", "aten"), ("_batched", "aten"), ("_asked", False),
                       ("_batched_asked", False)):
        monkeypatch.setattr(gemm, var, value)  # restored after the test, as set_backend changes them
    return loaded


def test_only_the_first_load_warns_of_a_narrowed_core(monkeypatch, caplog):
    loaded = _narrowed(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="aligndraw.gemm"):
        gemm.set_batched_backend("openblas")
        assert "OPENBLAS_CORETYPE=Haswell" in caplog.text
        caplog.clear()
        gemm.set_backend("openblas")  # loaded already: neither loaded nor said again
        gemm.prepare()
    assert loaded == [True] and caplog.text == ""


@pytest.mark.parametrize("how", ["prepare", "set_batched_backend", "set_backend"])
def test_every_way_of_loading_openblas_checks_its_kernels(monkeypatch, caplog, how):
    loaded = _narrowed(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="aligndraw.gemm"):
        if how == "prepare":
            monkeypatch.setattr(gemm, "_batched", "openblas")  # the AVX-512 AMD default, not loaded yet
            gemm.prepare()
        else:
            getattr(gemm, how)("openblas")
    assert loaded == [True] and "OPENBLAS_CORETYPE=Haswell is set" in caplog.text


def test_missing_says_what_is_missing(monkeypatch):
    monkeypatch.setattr(openblas, "numpy_openblas", lambda: None)
    assert "numpy carries no OpenBLAS" in openblas.missing()
    monkeypatch.setattr(openblas, "loaded", lambda: False)  # a process that has not built it
    with pytest.raises(ValueError, match="'openblas' asked for, but numpy carries no OpenBLAS.*use 'aten'"):
        gemm.set_backend("openblas")
    monkeypatch.setattr(openblas, "numpy_openblas", lambda: openblas.Path("/any/libopenblas.so"))
    monkeypatch.setattr(extensions.shutil, "which", lambda name: None)
    monkeypatch.setenv("CXX", "my-c++")
    assert "no C++ compiler (my-c++; set CXX)" in openblas.missing()
    monkeypatch.setattr(extensions.shutil, "which", lambda name: None if name == "ninja" else name)
    assert "no ninja" in openblas.missing()


def _unbuildable(monkeypatch):
    def fail():
        raise RuntimeError("the build failed")

    monkeypatch.setattr(openblas, "loaded", lambda: False)
    monkeypatch.setattr(openblas, "load", fail)
    monkeypatch.setattr(gemm, "_backend", "openblas")
    monkeypatch.setattr(gemm, "_batched", "aten")  # restored after the test, as the others


def test_a_default_openblas_that_fails_to_build_falls_back_to_aten(monkeypatch, caplog):
    _unbuildable(monkeypatch)
    monkeypatch.setattr(gemm, "_asked", False)
    with caplog.at_level(logging.WARNING, logger="aligndraw.gemm"):
        assert gemm.prepare() == "aten"
    assert gemm.backend() == "aten" and "the build failed" in caplog.text
    x, w = _rand(4, 96), _rand(130, 96, seed=1)
    _close(gemm.linear(x, w), _f64(x, w.T))


def test_using_another_backend_leaves_a_default_openblas_unloaded(monkeypatch):
    _unbuildable(monkeypatch)  # loading it would raise
    monkeypatch.setattr(gemm, "_asked", False)
    with gemm.using("aten"):
        assert gemm.backend() == "aten"
    assert (gemm._backend, gemm._asked) == ("openblas", False)  # as it was, still not loaded


def test_an_asked_for_openblas_that_fails_to_build_is_an_error(monkeypatch):
    _unbuildable(monkeypatch)
    monkeypatch.setattr(gemm, "_asked", True)
    with pytest.raises(RuntimeError, match="'openblas': the build failed"):
        gemm.prepare()
    assert gemm.backend() == "openblas"


@needs_openblas
def test_choosing_a_loaded_openblas_does_not_look_for_the_build_tools_again(monkeypatch):
    def fail():
        raise AssertionError("missing() called for a loaded op")

    monkeypatch.setattr(openblas, "missing", fail)
    with gemm.using("openblas"):
        assert gemm.backend() == "openblas"


def _stack_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as the stack ``t`` (P, rows, cols) in another memory layout."""
    if layout == "transposed":  # each matrix column-major (a bmm gradient's operand)
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "broadcast":  # one matrix for every batch entry: batch stride 0
        return t[:1].expand_as(t)
    if layout == "interleaved":  # neither row- nor column-major: packed first
        wide = torch.zeros(t.shape[0], t.shape[1], 2 * t.shape[2])
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


STACK_LAYOUTS = ("row-major", "transposed", "broadcast", "interleaved")


@needs_openblas
@pytest.mark.parametrize("layout_a", STACK_LAYOUTS)
@pytest.mark.parametrize("layout_b", STACK_LAYOUTS)
def test_batched_products_equal_float64_in_every_layout(layout_a, layout_b):
    a, b, c = _rand(7, 8, 60), _rand(7, 60, 9, seed=1), _rand(7, 8, 9, seed=2)
    a2, b2 = _stack_layout(a, layout_a), _stack_layout(b, layout_b)
    want = a2.double() @ b2.double()  # (P, 8, 9)
    _close(openblas.bmm(a2, b2), want.float())
    _close(openblas.baddbmm(c, a2, b2), (c.double() + want).float())


@needs_openblas
@pytest.mark.parametrize("p,m,k,n", [(200, 8, 60, 60), (100, 60, 60, 8), (100, 1, 12, 1200),
                                     (100, 12, 1, 1200), (3, 1, 1, 1), (1, 5, 7, 3)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_batched_products_at_the_steps_shapes_and_any_thread_count(p, m, k, n, threads):
    a, b, c = _rand(p, m, k), _rand(p, k, n, seed=1), _rand(p, m, n, seed=2)
    with torch_threads(threads):
        _close(openblas.bmm(a, b), (a.double() @ b.double()).float())
        _close(openblas.baddbmm(c, a, b), (c.double() + a.double() @ b.double()).float())


@needs_openblas
def test_batched_products_with_empty_sides_and_bad_operands():
    assert openblas.bmm(torch.zeros(0, 3, 5), torch.zeros(0, 5, 7)).shape == (0, 3, 7)
    assert torch.equal(openblas.bmm(torch.ones(2, 3, 0), torch.ones(2, 0, 7)), torch.zeros(2, 3, 7))
    c = _rand(2, 3, 7)
    kept = c.clone()
    assert torch.equal(openblas.baddbmm(c, torch.ones(2, 3, 0), torch.ones(2, 0, 7)), c)
    out = openblas.baddbmm(c, _rand(2, 3, 4, seed=1), _rand(2, 4, 7, seed=2))
    assert out.data_ptr() != c.data_ptr() and torch.equal(c, kept)  # c is never written
    with pytest.raises(RuntimeError, match=r"\(P, K, N\) stacks, got \[2, 3, 4\] and \[3, 4, 5\]"):
        openblas.bmm(torch.ones(2, 3, 4), torch.ones(3, 4, 5))
    with pytest.raises(RuntimeError, match=r"c must be \(2, 3, 5\), got \[3, 5\]"):
        openblas.baddbmm(torch.ones(3, 5), torch.ones(2, 3, 4), torch.ones(2, 4, 5))
    with pytest.raises(RuntimeError, match=r"CPU float32 tensor, got Double"):
        openblas.bmm(torch.ones(2, 3, 4, dtype=torch.float64), torch.ones(2, 4, 5))


def test_a_default_batched_openblas_that_fails_to_build_falls_back_to_aten(monkeypatch, caplog):
    _unbuildable(monkeypatch)
    monkeypatch.setattr(gemm, "_backend", "onednn")  # the plain products' backend needs no build
    monkeypatch.setattr(gemm, "_batched", "openblas")
    monkeypatch.setattr(gemm, "_batched_asked", False)
    with caplog.at_level(logging.WARNING, logger="aligndraw.gemm"):
        assert gemm.prepare() == "onednn"
    assert gemm.batched_backend() == "aten" and "the build failed" in caplog.text
    monkeypatch.setattr(gemm, "_batched", "openblas")
    monkeypatch.setattr(gemm, "_batched_asked", True)
    with pytest.raises(RuntimeError, match="'openblas': the build failed"):
        gemm.prepare()
