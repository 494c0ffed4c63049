"""A naive, per-module reference of the alignDRAW recurrence, for equivalence tests.

It shares the parameters of an ``AlignDraw`` but calls every module separately, step by step:
``nn.LSTMCell`` for both LSTMs, the alignment recomputing U h_lang every step, filterbanks with
explicit loops, KL from ``torch.distributions``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from aligndraw.model import AlignDraw


def naive_filterbank(g, delta, sigma2, size, n, eps=1e-4):
    """(B, N, size) by explicit loops over batch, filter and pixel."""
    banks = []
    for b in range(g.shape[0]):
        rows = []
        for i in range(1, n + 1):
            mu = g[b] + (i - n / 2 - 0.5) * delta[b]
            row = torch.stack([torch.exp(-((a - mu) ** 2) / (2 * sigma2[b]))
                               for a in range(1, size + 1)])
            rows.append(row / (row.sum() + eps))
        banks.append(torch.stack(rows))
    return torch.stack(banks)


def _window(params, height, width, n):
    gx, gy, log_s2, log_d, log_g = params.unbind(-1)
    gx = (width + 1) / 2 * (gx + 1)
    gy = (height + 1) / 2 * (gy + 1)
    delta = (max(height, width) - 1) / (n - 1) * log_d.exp()
    return gx, gy, delta, log_s2.exp(), log_g.exp()


def _banks(params, height, width, n):
    gx, gy, delta, s2, gamma = _window(params, height, width, n)
    return naive_filterbank(gx, delta, s2, width, n), naive_filterbank(gy, delta, s2, height, n), gamma


def naive_forward(model: AlignDraw, images, tokens, lengths, noise):
    """Returns nll (B,), kl_steps (B, T) and log importance weight (B,), the slow, obvious way."""
    cfg = model.config
    b = images.shape[0]
    h_lang = model.encoder(tokens, lengths)
    mask = torch.arange(tokens.shape[1], device=tokens.device)[None] < lengths[:, None]
    h_enc, c_enc = model.h_enc0.expand(b, -1), model.c_enc0.expand(b, -1)
    h_dec, c_dec = model.h_dec0.expand(b, -1), model.c_dec0.expand(b, -1)
    canvas = model.canvas0.expand(b, -1, -1, -1)
    kls, log_ratios = [], []
    for t in range(cfg.steps):
        error = images - torch.sigmoid(canvas)
        fx, fy, gamma = _banks(model.read_head(h_dec), cfg.height, cfg.width, cfg.read_n)
        glimpses = [torch.einsum("bnh,bhw,bmw->bnm", fy, img[:, c], fx) * gamma[:, None, None]
                    for img in (images, error) for c in range(cfg.channels)]
        r = torch.stack(glimpses, 1).flatten(1)
        h_enc, c_enc = model.enc_lstm(torch.cat([r, h_dec], 1), (h_enc, c_enc))
        mu_q, log_sigma_q = model.posterior(h_enc).chunk(2, -1)
        z = mu_q + log_sigma_q.exp() * noise[:, t]
        if t == 0:
            prior = Normal(torch.zeros_like(mu_q), torch.ones_like(mu_q))
        else:
            mu_p, log_sigma_p = torch.tanh(model.prior(h_dec)).chunk(2, -1)
            prior = Normal(mu_p, log_sigma_p.exp())
        kls.append(kl_divergence(Normal(mu_q, log_sigma_q.exp()), prior).sum(-1))
        log_ratios.append(prior.log_prob(z).sum(-1) - Normal(mu_q, log_sigma_q.exp()).log_prob(z).sum(-1))
        if model.alignment is not None:
            al = model.alignment
            e = al.v(torch.tanh(al.U(h_lang) + al.W(h_dec)[:, None])).squeeze(-1)
            alpha = torch.softmax(e.masked_fill(~mask, -1e30), -1) * mask
        else:
            alpha = mask / mask.sum(-1, keepdim=True)
        s = (alpha[..., None] * h_lang).sum(1)
        h_dec, c_dec = model.dec_lstm(torch.cat([z, s], 1), (h_dec, c_dec))
        fx, fy, gamma = _banks(model.write_head(h_dec), cfg.height, cfg.width, cfg.write_n)
        patch = model.write_patch(h_dec).view(b, cfg.channels, cfg.write_n, cfg.write_n)
        canvas = canvas + torch.einsum("bmh,bcmn,bnw->bchw", fy, patch, fx) / gamma[:, None, None, None]
    nll = F.binary_cross_entropy(torch.sigmoid(canvas), images, reduction="none").flatten(1).sum(1)
    return nll, torch.stack(kls, 1), -nll + torch.stack(log_ratios, 1).sum(1)
