"""Soft alignment over the caption's words, driven by the previous generative state (PAPER.md).

    e_j^t = vᵀ tanh(U h_lang_j + W h_dec_{t−1} + b)
    α_j^t = softmax_j(e_j^t)          over real words only; padding gets 0
    s_t   = Σ_j α_j^t h_lang_j

U h_lang_j + b does not depend on t, so ``Alignment.keys`` computes it once per caption and
each step only adds the query W h_dec_{t−1} (which the model computes in its fused per-step
projection of h_dec). Both come doubled, for the sigmoid form of the scores, tanh(x) = 2σ(2x) − 1,
and σ(2k + 2q) = 1 / (1 + e^(−2k)·e^(−2q)) takes its (B, L, A) exponentials once per caption
(``key_factors``, ``factored_align_weights``).

Symbols: B batch, L words, A alignment size, D2 = 2·D_lang.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from aligndraw import gemm

# Doubled pre-activations are clamped to ±FACTOR_BOUND before exp(−·): e^80 ≈ 5.5e34 is a normal
# fp32 (and bf16) number (the largest is ≈ e^88.7), so neither factor overflows or vanishes.
FACTOR_BOUND = 80.0


def key_factors(keys2: Tensor) -> Tensor:
    """e^(−keys2), once per caption: (B, L, A), for ``factored_scores`` (which takes the
    query's e^(−query2) the same way, every step).

    keys2 = 2·(U h_lang + b), clamped to ±``FACTOR_BOUND`` first (see ``factored_scores``).
    """
    return torch.exp(-keys2.clamp(-FACTOR_BOUND, FACTOR_BOUND))


def factored_scores(keys2: Tensor, factors: Tensor, query2: Tensor, v: Tensor) -> Tensor:
    """vᵀ tanh(k + q) from 2k, e^(−2k) (``key_factors(keys2)``) and 2q: (B, L, A) twice, (B, A),
    (A,) → (B, L).

    σ(2k + 2q) = 1 / (1 + e^(−2k)·e^(−2q)): with e^(−2k) computed once per caption, a step
    takes B·A exponentials instead of B·L·A, and each (B, L, A) element is one product, one
    sum and one division (``benchmarks/alignment_scores.py``). The scores are then
    2·vᵀσ − Σv (tanh(x) = 2σ(2x) − 1). ``keys2`` carries the keys' gradient: the backward
    is σ' = s(1 − s), the sigmoid form's own, with no factor in it (s computed again from
    the factors: ``_FactoredScores``).

    Exactness: both doubled pre-activations are clamped to ±80 so that the factors stay
    finite and nonzero (no NaN). Where |k| ≤ 31 the result equals the tanh form's to fp32
    rounding whatever q is: a clamp on 2q then only acts where |2k + 2q| > 18 either way,
    where σ is 1 in fp32 or below 1.5e-8. Only a unit whose key and query both lie beyond
    ±31, with opposite signs, can differ (``tests/test_alignment.py``).
    """
    return _FactoredScores.apply(keys2, factors, query2, v)


def _sigmoids(factors: Tensor, q: Tensor) -> Tensor:
    """σ(2k + 2q) = 1 / (1 + e^(−2k)·e^(−2q)), eagerly: two passes over (B, L, A), 1 + f·q as
    one ``addcmul``, then the reciprocal in place.

    factors (B, L, A), q (B, A) → s (B, L, A), a new tensor.
    """
    return torch.addcmul(factors.new_ones(()), factors, q[:, None, :]).reciprocal_()


def _eager_scores_backward(factors: Tensor, q: Tensor, v: Tensor,
                           grad: Tensor) -> tuple[Tensor, None, Tensor, Tensor]:
    """``_FactoredScores.backward`` eagerly: after s, five passes over (B, L, A), not seven.

    factors (B, L, A), q (B, A), v (A,), grad (B, L) → the gradients of keys2 (B, L, A),
    of factors (None), query2 (B, A) and v (A,). v's gradient is one matrix-vector product
    over the B·L rows (no g·s tensor), and 2g·v·s(1 − s) is (s − s²)·2g·v, in place on s.
    Compiled, the backward keeps the form the compiler fuses (``_FactoredScores.backward``).
    """
    b, length, a = factors.shape
    s = _sigmoids(factors, q)  # (B, L, A)
    grad2 = grad.to(s.dtype) * 2  # (B, L), in s's dtype: a product does not promote
    rows = grad2.reshape(1, b * length)  # (1, B·L)
    dv = (rows @ s.reshape(b * length, a)).squeeze(0) - grad.sum()  # (1, B·L) @ (B·L, A) → (A,)
    dy = s.addcmul_(s, s, value=-1).mul_(grad2[..., None]).mul_(v)  # (B, L, A)
    return dy, None, dy.sum(1), dv


class _FactoredScores(torch.autograd.Function):
    """``factored_scores`` with the gradient of σ(keys2 + query2) as s(1 − s).

    Keeps no (B, L, A) tensor per step: the backward computes s again from the caption's
    factors (kept once for all T steps) and the step's (B, A) query factors. Kept, the T
    steps' s would be T·B·L·A floats (79 MB for mnist-captions) written in the forward and
    read back in the backward; computed again, the forward is one pass over the factors that
    never stores s, and the backward another.
    """

    @staticmethod
    def forward(ctx, keys2: Tensor, factors: Tensor, query2: Tensor, v: Tensor) -> Tensor:
        q = key_factors(query2)  # (B, A): e^(−2q), clamped as the keys' factors are
        ctx.save_for_backward(factors, q, v)
        if not torch.compiler.is_compiling():  # eagerly: two passes for s, a matrix-vector product
            return _sigmoids(factors, q) @ v * 2 - v.sum()  # (B, L)
        # compiled: s and the sum over A, which the compiler fuses into one loop (s never stored)
        s = (factors * q[:, None, :]).add_(1).reciprocal_()  # (B, L, A)
        return (s * v).sum(-1) * 2 - v.sum()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, Tensor, Tensor]:
        factors, q, v = ctx.saved_tensors
        if not torch.compiler.is_compiling():
            return _eager_scores_backward(factors, q, v, grad)
        # (B, L, A), the forward's s again; the product's operands in the other order, so that
        # the compiler's common-subexpression pass does not merge it with the forward's s and
        # then keep that one for the backward (T steps' s stored and read back)
        s = (q[:, None, :] * factors).add_(1).reciprocal_()
        gs = s * grad[..., None]  # g·s
        dv = 2 * gs.sum(1).sum(0) - grad.sum()  # (A,): the sum over L first, as for the query's
        dy = s.neg_().add_(1).mul_(gs).mul_(2 * v)  # (B, L, A): 2g·v·s(1 − s), in place on s
        return dy, None, dy.sum(1), dv


def factored_align_weights(keys2: Tensor, factors: Tensor, query2: Tensor, v: Tensor,
                           mask: Tensor) -> Tensor:
    """α_t: (B, L) weights summing to 1 over real words.

    Args: keys2 (B, L, A) = 2·(U h_lang + b) and factors = ``key_factors(keys2)``, once per
    caption. query2
    (B, A) = 2·W h_dec_{t−1}, doubled inside the model's fused projection. v (A,). mask (B, L)
    True on real words. A step does B·A exponentials and one product, one sum and one division
    per (B, L, A) element. (s_t = Σ_j α_j h_lang_j is never formed: the model mixes the
    words' gate contributions instead, ``AlignDraw.context_gates``.)
    """
    return masked_softmax(factored_scores(keys2, factors, query2, v), mask)


def masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """softmax over the last axis of (B, L) scores, 0 where ``mask`` is False (padding)."""
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)


def uniform_weights(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, L) equal weights on the real words (noalignDRAW's "alignment")."""
    alpha = mask.to(dtype)
    return alpha / alpha.sum(-1, keepdim=True)


def mean_context(h_lang: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Uniform weights over real words and s = mean of h_lang (the one-shot VAE baselines'
    sentence representation): alpha (B, L), s (B, D2)."""
    alpha = uniform_weights(mask, h_lang.dtype)  # (B, L)
    return alpha, (alpha[:, None, :] @ h_lang).squeeze(1)


class Alignment(nn.Module):
    """Parameters U, b, W, v of the alignment model."""

    def __init__(self, lang_dim: int, dec_dim: int, align_dim: int) -> None:
        super().__init__()
        self.U = nn.Linear(lang_dim, align_dim)  # U h_lang + b
        self.W = nn.Linear(dec_dim, align_dim, bias=False)
        self.v = nn.Linear(align_dim, 1, bias=False)

    def keys(self, h_lang: Tensor) -> Tensor:
        """(B, L, D2) → (B, L, A): U h_lang + b, once per caption."""
        return gemm.linear(h_lang, self.U.weight, self.U.bias)
