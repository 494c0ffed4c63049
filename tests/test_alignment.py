import pytest
import torch

from aligndraw.alignment import (
    Alignment,
    factored_align_weights,
    factored_scores,
    key_factors,
    mean_context,
)
from aligndraw.language import CaptionEncoder, padding_mask, reverse_index


def _setup(seed=0):
    torch.manual_seed(seed)
    al = Alignment(lang_dim=6, dec_dim=5, align_dim=4)
    h_lang = torch.randn(3, 5, 6)
    mask = padding_mask(torch.tensor([5, 2, 1]), 5)
    return al, h_lang, mask


def _weights(al, h_lang, h_dec, mask):
    keys2 = 2 * al.keys(h_lang)
    return factored_align_weights(keys2, key_factors(keys2), 2 * al.W(h_dec), al.v.weight[0], mask)


def test_alignment_weights_sum_to_one_over_real_words_only():
    al, h_lang, mask = _setup()
    alpha = _weights(al, h_lang, torch.randn(3, 5), mask)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(3))
    assert (alpha[~mask] == 0).all()
    assert (alpha[mask] > 0).all()
    assert alpha[2, 0] == 1  # one word takes all the weight


def test_alignment_matches_naive_per_word_loop():
    al, h_lang, mask = _setup(1)
    h_dec = torch.randn(3, 5)
    alpha = _weights(al, h_lang, h_dec, mask)
    for b in range(3):
        n = int(mask[b].sum())
        e = torch.stack([al.v(torch.tanh(al.U(h_lang[b, j]) + al.W(h_dec[b]))).squeeze()
                         for j in range(n)])
        a = torch.softmax(e, 0)
        torch.testing.assert_close(alpha[b, :n], a)


def test_padding_content_does_not_change_alignment():
    al, h_lang, mask = _setup(2)
    other = h_lang.clone()
    other[~mask] = 100.0
    h_dec = torch.randn(3, 5)
    torch.testing.assert_close(_weights(al, h_lang, h_dec, mask), _weights(al, other, h_dec, mask))


def test_mean_context_is_mean_of_real_words():
    _, h_lang, mask = _setup()
    alpha, s = mean_context(h_lang, mask)
    torch.testing.assert_close(s[1], h_lang[1, :2].mean(0))
    torch.testing.assert_close(alpha.sum(-1), torch.ones(3))


def test_encoder_padding_does_not_change_real_word_states():
    torch.manual_seed(0)
    enc = CaptionEncoder(vocab_size=10, embed_dim=6, hidden=5)
    with torch.no_grad():
        enc.h0.normal_()  # learned initial states must be used by both directions
    tokens = torch.tensor([[3, 4, 5, 0, 0]])
    alone = enc(tokens[:, :3], torch.tensor([3]))
    padded = enc(tokens, torch.tensor([3]))
    torch.testing.assert_close(padded[:, :3], alone)
    assert (padded[:, 3:] == 0).all()
    # The backward direction reads each caption from its own last word: it equals a
    # forward LSTM (same weights) run over the reversed real words.
    fwd_only = torch.nn.LSTM(6, 5, batch_first=True)
    fwd_only.load_state_dict({k.replace("_reverse", ""): v for k, v in enc.lstm.state_dict().items()
                              if "reverse" in k})
    emb = enc.embedding(torch.tensor([[5, 4, 3]]))
    h0 = (enc.h0[1:2], enc.c0[1:2])
    out, _ = fwd_only(emb, h0)
    torch.testing.assert_close(alone[0, :, 5:], out[0].flip(0))


def _tanh_scores(k, q, v):
    return torch.tanh(k + q[:, None, :]) @ v  # (B, L)


def test_factored_scores_and_gradients_equal_the_tanh_form():
    g = torch.Generator().manual_seed(1)
    k = (torch.randn(4, 7, 16, generator=g, dtype=torch.float64) * 3).requires_grad_()
    q = (torch.randn(4, 16, generator=g, dtype=torch.float64) * 3).requires_grad_()
    v = torch.randn(16, generator=g, dtype=torch.float64).requires_grad_()
    ref = _tanh_scores(k, q, v)
    out = factored_scores(2 * k, key_factors(2 * k), 2 * q, v)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn(4, 7, generator=g, dtype=torch.float64)
    ref_grads = torch.autograd.grad((ref * w).sum(), (k, q, v))
    grads = torch.autograd.grad((out * w).sum(), (k, q, v))
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    k32, q32, v32 = k.detach().float(), q.detach().float(), v.detach().float()
    low = factored_scores(2 * k32, key_factors(2 * k32), 2 * q32, v32)
    torch.testing.assert_close(low.double(), ref.detach(), rtol=1e-5, atol=1e-5)


def test_factored_scores_hold_for_any_query_where_keys_are_within_31():
    """The ±80 clamp on 2q only acts where σ is 1 in fp32 or below 1.5e-8 either way."""
    g = torch.Generator().manual_seed(2)
    k = (torch.rand(3, 5, 64, generator=g, dtype=torch.float64) * 2 - 1) * 31
    q = torch.randn(3, 64, generator=g, dtype=torch.float64) * 500  # most beyond ±40
    assert (q.abs() > 40).float().mean() > 0.9
    v = torch.randn(64, generator=g, dtype=torch.float64)
    ref = _tanh_scores(k, q, v)
    out = factored_scores(2 * k.float(), key_factors(2 * k.float()), 2 * q.float(), v.float())
    # Each of the 64 terms within 2·1.5e-8·|v| of the exact value, plus fp32 rounding.
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=64 * 3e-8 * float(v.abs().max()) + 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_factored_scores_stay_finite_for_extreme_pre_activations(dtype):
    g = torch.Generator().manual_seed(3)
    k = (torch.randn(3, 5, 32, generator=g, dtype=dtype) * 1e4).requires_grad_()
    q = (torch.randn(3, 32, generator=g, dtype=dtype) * 1e4).requires_grad_()
    v = torch.randn(32, generator=g, dtype=dtype)
    out = factored_scores(2 * k, key_factors(2 * k), 2 * q, v)
    assert torch.isfinite(out).all() and (out.abs() <= v.abs().sum() + 1e-3).all()
    grads = torch.autograd.grad(out.sum(), (k, q))
    assert all(torch.isfinite(gr).all() for gr in grads)


@pytest.mark.parametrize("scale", [3.0, 1e4])
def test_compiled_factored_scores_gradients_equal_eager(scale, monkeypatch):
    """The compiled backward (s computed again from the factors, ``_FactoredScores``) gives
    eager's gradients, finite for extreme pre-activations too. Each backward is its own form:
    the eager one (fewer passes over (B, L, A)) eagerly only, the fused one under the compiler."""
    import aligndraw.alignment as alignment

    eager_backward_calls = []
    eager_backward = alignment._eager_scores_backward
    monkeypatch.setattr(alignment, "_eager_scores_backward",
                        lambda *args: eager_backward_calls.append(1) or eager_backward(*args))
    g = torch.Generator().manual_seed(4)
    k = torch.randn(3, 5, 32, generator=g) * scale
    q = torch.randn(3, 32, generator=g) * scale
    v = torch.randn(32, generator=g)

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (k, q, v)]
        kk, qq, vv = leaves
        out = fn(2 * kk, key_factors(2 * kk), 2 * qq, vv)
        return torch.autograd.grad((out * torch.linspace(-1, 1, 5)).sum(), leaves)

    eager = grads(factored_scores)
    assert len(eager_backward_calls) == 1
    compiled = grads(torch.compile(factored_scores, fullgraph=True, dynamic=False))
    # the compiled backward traced the fused form: had it reached the spy, the count would
    # grow, or dynamo would refuse the spy's side effect (fullgraph) and fail the call above
    assert len(eager_backward_calls) == 1
    for got, want in zip(compiled, eager, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _packed_reference(enc: CaptionEncoder, lstm: torch.nn.LSTM, tokens: torch.Tensor,
                      lengths: torch.Tensor) -> torch.Tensor:
    """h_lang from ``nn.LSTM`` over packed sequences (each caption reversed on its own)."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    b, max_len = tokens.shape
    packed = pack_padded_sequence(enc.embedding(tokens), lengths, batch_first=True, enforce_sorted=False)
    state = (enc.h0.expand(-1, b, -1).contiguous(), enc.c0.expand(-1, b, -1).contiguous())
    out, _ = lstm(packed, state)
    return pad_packed_sequence(out, batch_first=True, total_length=max_len)[0]


@pytest.mark.parametrize("vocab", [7, 500])  # input gates by table lookup / per batch word
def test_encoder_equals_packed_nn_lstm_states_and_gradients(vocab):
    torch.manual_seed(0)
    enc = CaptionEncoder(vocab_size=vocab, embed_dim=6, hidden=5).double()
    with torch.no_grad():
        for p in enc.parameters():
            p.normal_(0, 0.5)
    lengths = torch.tensor([5, 2, 4, 1])
    tokens = torch.randint(1, vocab, (4, 5)) * padding_mask(lengths, 5)
    lstm = torch.nn.LSTM(6, 5, batch_first=True, bidirectional=True).double()
    lstm.load_state_dict(enc.lstm.state_dict())  # same names and shapes as nn.LSTM's
    out = enc(tokens, lengths)
    ref = _packed_reference(enc, lstm, tokens, lengths)
    torch.testing.assert_close(out, ref)
    assert (out[1, 2:] == 0).all() and (out[3, 1:] == 0).all()
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in enc.named_parameters()}
    enc.zero_grad()
    (ref * weights).sum().backward()
    ref_grads = {n: p.grad for n, p in enc.named_parameters() if p.grad is not None}
    ref_grads |= {f"lstm.{n}": p.grad for n, p in lstm.named_parameters()}
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], msg=lambda m, n=name: f"{n}: {m}")


def test_reverse_index_reverses_real_words_only_and_is_an_involution():
    lengths = torch.tensor([3, 1, 4])
    idx = reverse_index(lengths, 4)
    assert idx.tolist() == [[2, 1, 0, 3], [0, 1, 2, 3], [3, 2, 1, 0]]
    assert torch.equal(idx.gather(1, idx), torch.arange(4).expand(3, 4))


@pytest.mark.parametrize("shape", [(3, 5, 8), (1, 1, 4), (4, 1, 4), (1, 7, 4)])
@pytest.mark.parametrize("dtypes", [("float32", "float32"), ("bfloat16", "float32"),
                                    ("float32", "bfloat16")])
def test_factored_scores_eager_gradients_for_mixed_dtypes_and_single_rows(shape, dtypes):
    """Under autocast, keys and query may come in different dtypes (and the forward's product
    in bf16); one image or one word too. The gradients equal the tanh form's (computed in
    float64 from the same values)."""
    b, length, a = shape
    g = torch.Generator().manual_seed(5)
    k64 = torch.randn(b, length, a, generator=g, dtype=torch.float64)
    q64 = torch.randn(b, a, generator=g, dtype=torch.float64)
    v64 = torch.randn(a, generator=g, dtype=torch.float64)
    k_dtype, q_dtype = (getattr(torch, d) for d in dtypes)
    k, q = k64.to(k_dtype).requires_grad_(), q64.to(q_dtype).requires_grad_()
    v = v64.float().requires_grad_()
    mixed = torch.bfloat16 in (k_dtype, q_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
        out = factored_scores(2 * k, key_factors(2 * k), 2 * q, v)
    w = torch.randn(b, length, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * w).sum(), (k, q, v))  # outside autocast
    exact = [t.detach().double().requires_grad_() for t in (k, q, v)]  # the same (rounded) values
    want = torch.autograd.grad((_tanh_scores(*exact) * w).sum(), exact)
    tol = 3e-2 if mixed else 1e-4
    for got, ref, leaf in zip(grads, want, (k, q, v), strict=True):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * (1 + ref.abs().max().item()))
