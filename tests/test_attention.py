import pytest
import torch

from aligndraw import attention

from reference import naive_filterbank


def _random_window(batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 5, generator=g, dtype=torch.float64) * 0.5


def test_filterbank_matches_naive_loops():
    w = attention.window_params(_random_window(), height=11, width=13, n=4)
    fast = attention.filterbank(w.g_x, w.delta, w.sigma2, 13, 4)
    slow = naive_filterbank(w.g_x, w.delta, w.sigma2, 13, 4)
    torch.testing.assert_close(fast, slow)


def test_filterbank_rows_sum_to_one_inside_image():
    g = torch.tensor([6.0])
    f = attention.filterbank(g, torch.tensor([1.0]), torch.tensor([1.0]), 12, 3)
    torch.testing.assert_close(f.sum(-1), torch.ones(1, 3), atol=1e-3, rtol=0)


def test_zero_params_centre_the_grid():
    w = attention.window_params(torch.zeros(1, 5), height=60, width=60, n=8)
    assert w.g_x.item() == 30.5 and w.g_y.item() == 30.5  # centre of pixels 1..60
    mu = attention.grid_centres(w.g_x, w.delta, 8)
    # The N centres span the image symmetrically with stride (A−1)/(N−1) at δ̃ = 1.
    torch.testing.assert_close(mu[0, 0] + mu[0, -1], torch.tensor(61.0))
    torch.testing.assert_close(mu[0, 1] - mu[0, 0], torch.tensor(59 / 7))


def test_read_matches_einsum_reference():
    params = _random_window()
    w = attention.window_params(params, 10, 12, 5)
    fx, fy = attention.filterbanks(w, 10, 12, 5)
    images = torch.rand(3, 2, 10, 12, dtype=torch.float64)
    out = attention.read(images, fx, fy, w.gamma)
    ref = torch.einsum("bnh,bchw,bmw->bcnm", fy, images, fx) * w.gamma[:, None, None, None]
    assert out.shape == (3, 2, 5, 5)
    torch.testing.assert_close(out, ref)


def test_write_matches_einsum_reference_and_is_transpose_of_read():
    params = _random_window(seed=1)
    w = attention.window_params(params, 10, 12, 4)
    fx, fy = attention.filterbanks(w, 10, 12, 4)
    patch = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    out = attention.write(patch, fx, fy, w.gamma)
    ref = torch.einsum("bmh,bcmn,bnw->bchw", fy, patch, fx) / w.gamma[:, None, None, None]
    torch.testing.assert_close(out, ref)
    # <read(x), p> · (1/γ²) == <x, write(p)>: write is the adjoint of read up to γ.
    x = torch.rand(3, 1, 10, 12, dtype=torch.float64)
    lhs = (attention.read(x, fx, fy, w.gamma) * patch).sum((1, 2, 3)) / w.gamma**2
    rhs = (x * out).sum((1, 2, 3))
    torch.testing.assert_close(lhs, rhs)


def test_narrow_filter_reads_single_pixel():
    # A tiny σ and a grid of 2 filters at stride 1 around column/row 5.5 pick pixels 5 and 6.
    images = torch.arange(100.0).view(1, 1, 10, 10)
    g = torch.tensor([5.5])
    f = attention.filterbank(g, torch.tensor([1.0]), torch.tensor([1e-3]), 10, 2)
    out = attention.read(images, f, f, torch.ones(1))
    torch.testing.assert_close(out[0, 0], images[0, 0, 4:6, 4:6], atol=0, rtol=1e-3)


def test_window_box_spans_grid():
    w = attention.window_params(torch.zeros(1, 5), 60, 60, 8)
    box = attention.window_box(w, 8)
    # Full-image grid at δ̃=1: stride 59/7, box = centre ± 4 strides in 0-based pixels.
    half = 4 * 59 / 7
    torch.testing.assert_close(box[0], torch.tensor([29.5 - half, 29.5 - half,
                                                     29.5 + half, 29.5 + half]))


def test_batched_filterbanks_equal_separate_calls():
    windows = [attention.window_params(_random_window(seed=s), 12, 12, n)
               for s, n in ((0, 4), (1, 4), (2, 3))]
    sizes = [4, 4, 3]
    for height, width in ((12, 12), (10, 12)):
        batched = attention.filterbanks_batched(windows, sizes, height, width)
        for w, n, (fx, fy) in zip(windows, sizes, batched, strict=True):
            ref_x, ref_y = attention.filterbanks(w, height, width, n)
            torch.testing.assert_close(fx, ref_x)
            torch.testing.assert_close(fy, ref_y)


@pytest.mark.parametrize("channels", [1, 3])
def test_write_onto_equals_canvas_plus_write(channels):
    params = _random_window(seed=2)
    w = attention.window_params(params, 10, 12, 4)
    fx, fy = attention.filterbanks(w, 10, 12, 4)
    patch = torch.rand(3, channels, 4, 4, dtype=torch.float64)
    canvas = torch.randn(3, channels, 10, 12, dtype=torch.float64)
    out = attention.write_onto(canvas, patch, fx, fy, w.gamma)
    assert out.shape == canvas.shape
    torch.testing.assert_close(out, canvas + attention.write(patch, fx, fy, w.gamma))
    assert not torch.equal(out, canvas)  # the patch was added
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the canvas keeps its precision
        assert attention.write_onto(canvas.float(), patch.float(), fx.float(), fy.float(),
                                    w.gamma.float()).dtype == torch.float32


@pytest.mark.parametrize("channels", [1, 3])
def test_write_sum_equals_the_steps_written_one_by_one(channels):
    b, t, h, w, m = 3, 5, 10, 12, 4
    params = _random_window(batch=b * t, seed=4)
    win = attention.window_params(params, h, w, m)
    fx, fy = attention.filterbanks(win, h, w, m)  # (B·T, M, W), (B·T, M, H)
    patches = torch.rand(b, t, channels, m, m, dtype=torch.float64)
    canvas = torch.randn(b, channels, h, w, dtype=torch.float64)
    gamma = win.gamma.view(b, t)
    fx, fy = fx.view(b, t, m, w), fy.view(b, t, m, h)
    out = attention.write_sum(canvas, patches, fx, fy, gamma)
    expected = canvas.clone()
    for step in range(t):  # the sampling loop's order: c_t = c_{t−1} + write_t
        expected = expected + attention.write(patches[:, step], fx[:, step], fy[:, step], gamma[:, step])
    assert out.shape == canvas.shape
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert (out - canvas).abs().max() > 0.1  # the patches were added
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the canvas keeps its precision
        low = attention.write_sum(canvas.float(), patches.float(), fx.float(), fy.float(), gamma.float())
    assert low.dtype == torch.float32
    torch.testing.assert_close(low.double(), expected, rtol=2e-2, atol=2e-2)


def _narrow_windows(dtype):
    """Narrow filters (σ² from 0.05 to 2) at spread-out centres on a 60-pixel axis: their far
    weights fall through fp32's subnormal range (e^u for u down to about −57,000)."""
    g = torch.linspace(-5.0, 66.0, 12, dtype=dtype)
    sigma2 = torch.logspace(-1.3, 0.3, 12, dtype=dtype)
    return g, torch.full((12,), 3.0, dtype=dtype), sigma2


def _subnormal(t):
    return (t != 0) & (t.abs() < torch.finfo(t.dtype).tiny)


@pytest.mark.parametrize("compiled", [False, True])
def test_fp32_filterbank_has_no_subnormal_weights_and_equals_float64(compiled):
    g, delta, sigma2 = _narrow_windows(torch.float64)
    exact = naive_filterbank(g, delta, sigma2, 60, 8)
    assert _subnormal(exact.float()).any()  # the plain formula in fp32 does form them
    bank = torch.compile(attention.filterbank) if compiled else attention.filterbank
    f = bank(g.float(), delta.float(), sigma2.float(), 60, 8)
    assert not _subnormal(f).any()
    torch.testing.assert_close(f.double(), exact, rtol=1e-5, atol=1e-7)
    # what is dropped: weights under e^flush before normalisation, i.e. under √tiny
    dropped = (f == 0) & (exact > 0)
    assert dropped.any()
    limit = torch.finfo(torch.float32).tiny ** 0.5 / 1e-4  # √tiny, divided by the row sum + eps
    assert exact[dropped].max() < limit


def test_flushed_filterbank_gradients_are_finite_and_equal_float64():
    g, delta, sigma2 = (t.requires_grad_() for t in _narrow_windows(torch.float64))
    g32, delta32, sigma32 = (t.detach().float().requires_grad_() for t in (g, delta, sigma2))
    weights = torch.rand(12, 8, 60, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    (naive_filterbank(g, delta, sigma2, 60, 8) * weights).sum().backward()
    (attention.filterbank(g32, delta32, sigma32, 60, 8) * weights.float()).sum().backward()
    for fast, exact in ((g32, g), (delta32, delta), (sigma32, sigma2)):
        assert torch.isfinite(fast.grad).all()
        torch.testing.assert_close(fast.grad.double(), exact.grad, rtol=1e-4, atol=1e-6)


def test_flush_exponent_by_dtype():
    assert attention.flush_exponent(torch.float32) == pytest.approx(-43.67, abs=0.01)
    assert attention.flush_exponent(torch.bfloat16) == attention.flush_exponent(torch.float32)
    assert attention.flush_exponent(torch.float64) is None  # float64 keeps every weight
    assert attention.flush_exponent(torch.float16) is None


def test_a_nan_window_stays_nan_through_the_flush():
    """The flush must not turn a broken window (NaN σ²) into a silent all-zero filterbank."""
    g, delta, sigma2 = (torch.tensor([30.0, 30.0]), torch.tensor([2.0, 2.0]),
                        torch.tensor([1.0, float("nan")]))
    f = attention.filterbank(g, delta, sigma2, 60, 8)
    assert torch.isfinite(f[0]).all() and torch.isnan(f[1]).all()


def test_attend_gives_window_params_and_filterbanks_of_each_set():
    """PyTorch's path (fp64 here; fp32 on the CPU takes the C++ op, tests/test_step_kernels.py)."""
    g = torch.Generator().manual_seed(0)
    sets = [torch.randn(3, 5, generator=g, dtype=torch.float64) * 0.5,
            torch.randn(2, 5, generator=g, dtype=torch.float64) * 0.5]
    got = attention.attend(sets, 10, 12, 4)
    assert len(got) == 2
    for params, (gamma, f_x, f_y) in zip(sets, got, strict=True):
        w = attention.window_params(params, 10, 12, 4)
        want_x, want_y = attention.filterbanks(w, 10, 12, 4)
        torch.testing.assert_close(gamma, w.gamma)
        torch.testing.assert_close(f_x, want_x)
        torch.testing.assert_close(f_y, want_y)
        assert f_x.shape == (params.shape[0], 4, 12) and f_y.shape == (params.shape[0], 4, 10)
