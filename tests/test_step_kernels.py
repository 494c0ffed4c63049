import pytest
import torch

from aligndraw import attention, step_kernels
from aligndraw.alignment import factored_align_weights, factored_scores, key_factors
from aligndraw.language import lstm_update, padding_mask, sigmoid_tanh
from aligndraw.losses import gaussian_kl

from conftest import needs_step_kernels


@pytest.fixture(scope="module")
def kernels():
    """The kernels built and loaded: a test may be the first of its worker to call them."""
    assert step_kernels._load() is None


def _context_inputs(b=5, length=7, a=37, d=53, query_rows=None, seed=0):
    """Random factors, query, v, a padding mask and values; A and D off multiples of 8 and 16
    so that the vector loops have tails. The query comes as a column slice of a wider tensor,
    as it does from the model's projection."""
    g = torch.Generator().manual_seed(seed)
    keys2 = torch.randn(b, length, a, generator=g) * 2
    keys2[0, 0, :3] = torch.tensor([200.0, -200.0, 0.0])  # past the factors' clamp both ways
    query2 = (torch.randn(query_rows or b, a + 5, generator=g) * 2)[:, 5:]
    query2[0, :2] = torch.tensor([-150.0, 150.0])
    v = torch.randn(a, generator=g)
    lengths = torch.randint(1, length + 1, (b,), generator=g)
    lengths[0] = length
    values = torch.randn(b, length, d, generator=g)
    return keys2, query2, v, padding_mask(lengths, length), values


@needs_step_kernels
@pytest.mark.parametrize("query_rows", [None, 1])  # one query per image, or h_dec_0's for all
def test_context_equals_pytorch_ops(query_rows, kernels):
    keys2, query2, v, mask, values = _context_inputs(query_rows=query_rows)
    factors = key_factors(keys2)
    with torch.no_grad():
        assert step_kernels.usable(factors, v, values)
        alpha, mixed = step_kernels.context(factors, query2, v, mask, values)
    want = factored_align_weights(keys2, factors, query2, v, mask)
    torch.testing.assert_close(alpha, want, rtol=1e-5, atol=1e-6)
    assert (alpha[~mask] == 0).all()
    torch.testing.assert_close(mixed, (want[:, None, :] @ values).squeeze(1), rtol=1e-5, atol=1e-5)


@needs_step_kernels
@pytest.mark.parametrize("d", [3, 8, 21, 37])  # under, at and past one AVX2 vector (8 lanes), past 16
def test_lstm_equals_lstm_update_of_the_summed_shares(d, kernels):
    g = torch.Generator().manual_seed(d)
    wide = torch.randn(6, 4 * d + 7, generator=g) * 3
    parts = [wide[:, 7:], torch.randn(6, 4 * d, generator=g), torch.randn(1, 4 * d, generator=g)]
    c = torch.randn(d, generator=g).expand(6, d)  # c_0 is the same for every image
    with torch.no_grad():
        h, c_new = step_kernels.lstm(parts, c)
    want_h, want_c = lstm_update(parts[0] + parts[1] + parts[2], c)
    torch.testing.assert_close(c_new, want_c, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h, want_h, rtol=1e-5, atol=1e-6)


@needs_step_kernels
def test_prior_sample_equals_the_models_formula(kernels):
    g = torch.Generator().manual_seed(0)
    pre = (torch.randn(5, 2 * 19 + 4, generator=g) * 3)[:, 4:]  # a slice of the projection
    eps = torch.randn(5, 3, 19, generator=g)[:, 1]  # ε_t of a (B, T, Z) draw
    with torch.no_grad():
        z = step_kernels.prior_sample(pre, eps)
    mu, log_sigma = sigmoid_tanh(pre).chunk(2, dim=-1)
    torch.testing.assert_close(z, mu + log_sigma.exp() * eps, rtol=1e-5, atol=1e-6)


@needs_step_kernels
def test_context_gives_nan_where_no_word_is_real_as_pytorch_ops_do(kernels):
    keys2, query2, v, mask, values = _context_inputs()
    mask[1] = False
    factors = key_factors(keys2)
    with torch.no_grad():
        alpha, mixed = step_kernels.context(factors, query2, v, mask, values)
    want = factored_align_weights(keys2, factors, query2, v, mask)
    assert want[1].isnan().all() and alpha[1].isnan().all() and mixed[1].isnan().all()
    assert not alpha[[0, 2, 3, 4]].isnan().any()


@needs_step_kernels
def test_the_kernels_name_what_they_reject(kernels):
    keys2, query2, v, mask, values = _context_inputs()
    factors = key_factors(keys2)
    with pytest.raises(RuntimeError, match="factors must be a 3-d CPU Float tensor, got a 3-d cpu Double"):
        step_kernels.context(factors.double(), query2, v, mask, values)
    with pytest.raises(RuntimeError, match=r"shapes must be factors \(B, L, A\)"):
        step_kernels.context(factors, query2, v, mask, values[:, :3])
    with pytest.raises(RuntimeError, match="mask must be a 2-d CPU Bool tensor"):
        step_kernels.context(factors, query2, v, mask.float(), values)
    with pytest.raises(RuntimeError, match=r"each share of the gates must be \(B, 4D\) or \(1, 4D\)"):
        step_kernels.lstm([torch.zeros(2, 12)], torch.zeros(2, 4))
    with pytest.raises(RuntimeError, match="at least one share"):
        step_kernels.lstm([], torch.zeros(2, 4))
    with pytest.raises(RuntimeError, match=r"pre must be \(B, 2Z\) = \(2, 8\)"):
        step_kernels.prior_sample(torch.zeros(2, 6), torch.zeros(2, 4))


def _grads(outputs, inputs, seed=1):
    """The gradients of Σ out·G for fixed random G (one per output) with respect to inputs."""
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outputs]
    return torch.autograd.grad(sum((o * w).sum() for o, w in zip(outputs, weights, strict=True)), inputs)


def _pytorch_attend(params, n, height, width):
    windows = [attention.window_params(p, height, width, n) for p in params]
    banks = attention.filterbanks_batched(windows, [n] * len(windows), height, width)
    return [t for w, (f_x, f_y) in zip(windows, banks, strict=True) for t in (w.gamma, f_x, f_y)]


@needs_step_kernels
@pytest.mark.parametrize(("n", "height", "width"), [(8, 60, 60), (3, 13, 21), (2, 9, 4)])
def test_attend_and_its_gradient_equal_window_params_and_filterbanks(n, height, width, kernels):
    """Against PyTorch's ops in fp32 (what the op replaces; both flush the same weights) and,
    the values, in fp64: sizes off the vector width, both axes apart, two sets of windows as
    column slices of one projection, a narrow window (σ² = e^−5), one wider than the image and
    one whose far weights are flushed to 0."""
    g = torch.Generator().manual_seed(n)
    wide = torch.randn(6, 13, generator=g) * 0.6
    wide[0, 5] = -5.0  # the first write window's log σ²
    wide[1, 10] = 4.0  # a read window's
    wide[2, 5] = 1.0  # σ² = e: weights from 1e-19 down to subnormal numbers 16–21 pixels off centre
    wide[3, 10] = -50.0  # a read window's σ² = e^−50: σ⁴ is below fp32's range
    mine, theirs = wide.clone().requires_grad_(), wide.clone().requires_grad_()
    got = step_kernels.attend([mine[:, 3:8], mine[:, 8:13]], height, width, n, 1e-4,
                              attention.flush_exponent(torch.float32))
    got = [t for part in zip(*(x.split([6, 6]) for x in got), strict=True) for t in part]  # γ, F_x, F_y each
    want = _pytorch_attend([theirs[:, 3:8], theirs[:, 8:13]], n, height, width)
    exact = _pytorch_attend([wide.double()[:, 3:8], wide.double()[:, 8:13]], n, height, width)
    for a, b, c in zip(got, want, exact, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.double(), c, rtol=1e-4, atol=1e-5)
        assert torch.equal(a == 0, b == 0)  # the same weights flushed to exactly 0
    if width >= 30:  # the flush at work: weights that fp32 holds as normal numbers (fp64's, kept
        # whole, above 1e-30) but under e^−43.7 before normalisation are exactly 0, as in PyTorch's ops
        assert ((got[1][2] == 0) & (exact[1][2] > 1e-30)).any()
    grad, = _grads(got, [mine])
    want_grad, = _grads(want, [theirs])
    # the read window of σ² = e^−50 has every weight flushed: F is 0 and stays 0 near its numbers,
    # so their gradient is exactly 0 (γ's aside); PyTorch's ops give 0·∞ = NaN there in this
    # PyTorch (σ⁴ is below fp32's range), so they are left out of the comparison
    assert (grad[3, 8:12] == 0).all()
    want_grad[3, 8:12] = 0
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-5 * want_grad.abs().max().item())


@needs_step_kernels
def test_attend_without_gradients_and_through_the_library(kernels):
    """Without gradients the op itself, against PyTorch's ops; the library's ``attention.attend``
    routes fp32 CPU windows to it (the same tensors); a NaN window stays NaN."""
    params = torch.randn(4, 5, generator=torch.Generator().manual_seed(0)) * 0.5
    with torch.no_grad():
        gamma, f_x, f_y = step_kernels.attend([params], 12, 10, 3, 1e-4,
                                              attention.flush_exponent(torch.float32))
        (lib_gamma, lib_x, lib_y), = attention.attend([params], 12, 10, 3)
    want = _pytorch_attend([params.double()], 3, 12, 10)
    for a, b in zip((gamma, f_x, f_y), want, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)
    assert torch.equal(lib_x, f_x) and torch.equal(lib_y, f_y) and torch.equal(lib_gamma, gamma)
    params[1, 0] = float("nan")  # a NaN stays NaN, as in PyTorch's ops
    with torch.no_grad():
        nan_x = step_kernels.attend([params], 12, 10, 3, 1e-4, attention.flush_exponent(torch.float32))[1]
    assert nan_x[1].isnan().all() and not nan_x[[0, 2, 3]].isnan().any()


@needs_step_kernels
@pytest.mark.parametrize("query_rows", [None, 1])
def test_scores_and_their_gradient_equal_factored_scores(query_rows, kernels):
    """Against alignment.factored_scores (PyTorch's ops, the same gradient form) in fp32: tails off
    the vector width, clamped keys and queries, the query a column slice, or one row for all."""
    keys2, query2, v, _, _ = _context_inputs(query_rows=query_rows)
    inputs = [keys2.requires_grad_(), query2.detach().requires_grad_(), v.requires_grad_()]
    theirs = [x.detach().clone().requires_grad_() for x in inputs]
    got = step_kernels.scores(inputs[0], key_factors(inputs[0]), inputs[1], inputs[2])
    want = factored_scores(theirs[0], key_factors(theirs[0]), theirs[1], theirs[2])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(_grads([got], inputs), _grads([want], theirs), strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the op alone, to the same result as through its autograd function
        assert torch.equal(step_kernels.scores(keys2, key_factors(keys2), query2, v), got.detach())


@needs_step_kernels
def test_scores_gradient_is_the_same_whatever_the_threads(kernels):
    """v's gradient sums over all images: per image first, then in order, not per thread."""
    keys2, query2, v, _, _ = _context_inputs(b=9)
    grad = torch.randn(9, keys2.shape[1], generator=torch.Generator().manual_seed(2))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 16):  # one thread, two, more threads than images
            torch.set_num_threads(n)
            results.append(torch.ops.aligndraw_step.scores_backward(grad, key_factors(keys2), query2,
                                                                    80.0, v))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


@needs_step_kernels
@pytest.mark.parametrize("d", [3, 8, 21])
def test_lstm_gradients_equal_lstm_updates(d, kernels):
    """Shares of B rows and of one row (h_dec_0's), a column slice, and c_0 expanded from one
    learned row, as the model has them."""
    g = torch.Generator().manual_seed(d)
    wide = (torch.randn(6, 4 * d + 7, generator=g, dtype=torch.float64) * 3).requires_grad_()
    one_row = torch.randn(1, 4 * d, generator=g, dtype=torch.float64).requires_grad_()
    c0 = torch.randn(d, generator=g, dtype=torch.float64).requires_grad_()
    inputs64 = [wide, one_row, c0]
    inputs32 = [x.detach().float().requires_grad_() for x in inputs64]
    h, c = step_kernels.lstm([inputs32[0][:, 7:], inputs32[1]], inputs32[2].expand(6, d))
    want_h, want_c = lstm_update(wide[:, 7:] + one_row, c0.expand(6, d))
    torch.testing.assert_close(h.double(), want_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c.double(), want_c, rtol=1e-5, atol=1e-6)
    for a, b in zip(_grads([h, c], inputs32), _grads([want_h, want_c], inputs64), strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


@needs_step_kernels
@pytest.mark.parametrize("with_prior", [True, False])
def test_posterior_kl_and_its_gradient_equal_the_models_formula(with_prior, kernels):
    """z = μ_q + e^(log σ_q)·ε and gaussian_kl against the learned prior (tanh of its
    pre-activations, a column slice) or N(0, I), with ε a step's slice of a (B, T, Z) draw."""
    g = torch.Generator().manual_seed(int(with_prior))
    z_dim = 19
    post64 = (torch.randn(5, 2 * z_dim, generator=g, dtype=torch.float64) * 1.5).requires_grad_()
    wide64 = (torch.randn(5, 2 * z_dim + 4, generator=g, dtype=torch.float64) * 2).requires_grad_()
    eps = torch.randn(5, 3, z_dim, generator=g)[:, 1]
    post32, wide32 = (x.detach().float().requires_grad_() for x in (post64, wide64))
    z, kl = step_kernels.posterior_kl(post32, wide32[:, 4:] if with_prior else None, eps)
    mu_q, log_sigma_q = post64.chunk(2, dim=-1)
    prior = sigmoid_tanh(wide64[:, 4:]).chunk(2, dim=-1) if with_prior else (0.0 * mu_q, 0.0 * mu_q)
    want_z = mu_q + log_sigma_q.exp() * eps.double()
    want_kl = gaussian_kl(mu_q, log_sigma_q, *prior)
    torch.testing.assert_close(z.double(), want_z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl.double(), want_kl, rtol=1e-5, atol=1e-5)
    inputs32, inputs64 = ([post32, wide32], [post64, wide64]) if with_prior else ([post32], [post64])
    for a, b in zip(_grads([z, kl], inputs32), _grads([want_z, want_kl], inputs64), strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
    if with_prior:  # without gradients the op alone, to the same result as through its autograd function
        with torch.no_grad():
            assert torch.equal(step_kernels.posterior_kl(post32, wide32[:, 4:], eps)[1], kl.detach())


@needs_step_kernels
def test_the_gradient_kernels_name_what_they_reject(kernels):
    flush = attention.flush_exponent(torch.float32)
    with pytest.raises(RuntimeError, match=r"each tensor of windows' numbers must be \(B, 5\)"):
        step_kernels.attend([torch.zeros(3, 4)], 10, 10, 3, 1e-4, flush)
    with pytest.raises(RuntimeError, match="n at least 2"):
        step_kernels.attend([torch.zeros(3, 5)], 10, 10, 1, 1e-4, flush)
    with pytest.raises(RuntimeError, match=r"F_x \(R, n, W\)"):
        torch.ops.aligndraw_step.attend_backward(torch.zeros(3), torch.zeros(3, 2, 9), torch.zeros(3, 2, 10),
                                                 torch.zeros(3, 2, 9), torch.zeros(3, 2, 10),
                                                 [torch.zeros(3, 5)], 10, 10)
    with pytest.raises(RuntimeError, match=r"acts \(B, 5D\)"):
        torch.ops.aligndraw_step.lstm_backward(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 16),
                                               torch.zeros(2, 4))
    with pytest.raises(RuntimeError, match=r"prior must be \(B, 2Z\) like post"):
        step_kernels.posterior_kl(torch.zeros(2, 8), torch.zeros(1, 8), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="gives the noise eps no gradient"):
        step_kernels.posterior_kl(torch.zeros(2, 8), None, torch.zeros(2, 4, requires_grad=True))
    with pytest.raises(RuntimeError, match=r"post must be \(B, 2Z\) = \(2, 8\)"):
        step_kernels.posterior_kl(torch.zeros(2, 6), None, torch.zeros(2, 4))


@needs_step_kernels
def test_kernels_where_they_apply(monkeypatch, kernels):
    keys2, _, v, _, values = _context_inputs()
    factors = key_factors(keys2)
    assert not step_kernels.usable(factors, v, values)  # gradients on: autograd needs PyTorch's ops
    assert step_kernels.differentiable(factors, v, values)  # … except for the ops that carry them
    assert not step_kernels.differentiable(factors.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not step_kernels.differentiable(factors)
    with monkeypatch.context() as m:
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        assert not step_kernels.differentiable(factors)
    with torch.no_grad():
        assert step_kernels.usable(factors, v, values)
        assert not step_kernels.usable(factors.double(), v, values)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not step_kernels.usable(factors, v, values)
        with monkeypatch.context() as m:  # while torch.compile traces: PyTorch's ops, for it to fuse
            m.setattr(torch.compiler, "is_compiling", lambda: True)
            assert not step_kernels.usable(factors, v, values)
        monkeypatch.setenv(step_kernels.ENV, "0")
        step_kernels._load.cache_clear()
        try:
            assert step_kernels.missing() == f"{step_kernels.ENV}=0"
            assert not step_kernels.usable(factors, v, values)
            assert not step_kernels.differentiable(factors, v, values)
        finally:
            step_kernels._load.cache_clear()


def test_instruction_sets_follow_the_processors_flags():
    avx512 = {"avx512f", "avx512dq", "avx512vl", "avx512bw", "fma", "avx2", "f16c"}
    assert step_kernels.isa(frozenset(avx512))[1] == "avx512"
    assert step_kernels.isa(frozenset({"avx2", "fma", "f16c", "avx512f"}))[1] == "avx2"
    flags, name = step_kernels.isa(frozenset({"avx2", "f16c"}))  # AVX2 without FMA: portable
    assert name == "default" and flags == ("-DCPU_CAPABILITY=DEFAULT",)
    assert "-DCPU_CAPABILITY_AVX2" in step_kernels.isa(frozenset({"avx2", "fma", "f16c"}))[0]
