import pytest
import torch

from aligndraw import step_kernels
from aligndraw.alignment import factored_align_weights, key_factors
from aligndraw.language import lstm_update, padding_mask, sigmoid_tanh

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


@needs_step_kernels
def test_kernels_only_where_no_gradient_is_recorded(monkeypatch, kernels):
    keys2, _, v, _, values = _context_inputs()
    factors = key_factors(keys2)
    assert not step_kernels.usable(factors, v, values)  # gradients on: autograd needs PyTorch's ops
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
        finally:
            step_kernels._load.cache_clear()


def test_instruction_sets_follow_the_processors_flags():
    avx512 = {"avx512f", "avx512dq", "avx512vl", "avx512bw", "fma", "avx2", "f16c"}
    assert step_kernels.isa(frozenset(avx512))[1] == "avx512"
    assert step_kernels.isa(frozenset({"avx2", "fma", "f16c", "avx512f"}))[1] == "avx2"
    flags, name = step_kernels.isa(frozenset({"avx2", "f16c"}))  # AVX2 without FMA: portable
    assert name == "default" and flags == ("-DCPU_CAPABILITY=DEFAULT",)
    assert "-DCPU_CAPABILITY_AVX2" in step_kernels.isa(frozenset({"avx2", "fma", "f16c"}))[0]
