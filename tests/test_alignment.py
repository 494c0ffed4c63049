import torch

from aligndraw.alignment import Alignment, align, mean_context, sigmoid_form_scores, tanh_scores
from aligndraw.language import CaptionEncoder, padding_mask


def _setup(seed=0):
    torch.manual_seed(seed)
    al = Alignment(lang_dim=6, dec_dim=5, align_dim=4)
    h_lang = torch.randn(3, 5, 6)
    mask = padding_mask(torch.tensor([5, 2, 1]), 5)
    return al, h_lang, mask


def test_alignment_weights_sum_to_one_over_real_words_only():
    al, h_lang, mask = _setup()
    alpha, s = al(al.keys(h_lang), torch.randn(3, 5), h_lang, mask)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(3))
    assert (alpha[~mask] == 0).all()
    assert (alpha[mask] > 0).all()
    torch.testing.assert_close(s[2], h_lang[2, 0])  # one word: its state is the context


def test_alignment_matches_naive_per_word_loop():
    al, h_lang, mask = _setup(1)
    h_dec = torch.randn(3, 5)
    alpha, s = al(al.keys(h_lang), h_dec, h_lang, mask)
    for b in range(3):
        n = int(mask[b].sum())
        e = torch.stack([al.v(torch.tanh(al.U(h_lang[b, j]) + al.W(h_dec[b]))).squeeze()
                         for j in range(n)])
        a = torch.softmax(e, 0)
        torch.testing.assert_close(alpha[b, :n], a)
        torch.testing.assert_close(s[b], (a[:, None] * h_lang[b, :n]).sum(0))


def test_padding_content_does_not_change_alignment():
    al, h_lang, mask = _setup(2)
    other = h_lang.clone()
    other[~mask] = 100.0
    h_dec = torch.randn(3, 5)
    a1, s1 = align(al.keys(h_lang), al.W(h_dec), al.v.weight[0], h_lang, mask)
    a2, s2 = align(al.keys(other), al.W(h_dec), al.v.weight[0], other, mask)
    torch.testing.assert_close(a1, a2)
    torch.testing.assert_close(s1, s2)


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


def test_sigmoid_form_scores_equal_tanh_scores():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, 16, generator=g, dtype=torch.float64) * 3
    v = torch.randn(16, generator=g, dtype=torch.float64)
    ref = torch.stack([torch.stack([sum(v[a] * torch.tanh(x[b, j, a]) for a in range(16))
                                    for j in range(7)]) for b in range(4)])  # (4, 7)
    torch.testing.assert_close(tanh_scores(x, v), ref)
    torch.testing.assert_close(sigmoid_form_scores(x, v), ref)
    torch.testing.assert_close(sigmoid_form_scores(x.float(), v.float()), ref.float(),
                               atol=1e-5, rtol=1e-5)
