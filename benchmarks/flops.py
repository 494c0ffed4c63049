"""Analytic matmul FLOPs of alignDRAW per image, from a ``ModelConfig``.

Assumptions (so the figures can be checked by hand):
- Only matrix products count, at 2 FLOPs per multiply-add. Elementwise work (gate
  nonlinearities, filterbank construction, exp/tanh/sigmoid, KL, BCE) is left out: it is a few
  percent of the matmul FLOPs here, though not of the time.
- The *library's* algorithm is counted: the alignment keys U h_lang once per caption, not once
  per step as the naive reference does. Both models are therefore credited with the same
  useful work, and the naive one's redundant work shows up as a lower share of peak.
- The caption encoder runs over ``caption_len`` words in both directions; the embedding is a
  lookup (0 FLOPs). Its input gates W_ih·E[y] are counted as the library computes them: once
  per vocabulary word per batch (a table, shared by the batch's images) when the vocabulary is
  no larger than the batch's words, else once per word.
- Every step computes the prior head, including the first (where it is then unused), as the
  library does.
- Training ≈ 3 × forward (backward ≈ 2 × forward: one product for the input gradient, one for
  the weight gradient); the optimiser step is not counted.

Symbols: C/H/W image, N read grid, M write grid, Z latent, De/Dd LSTM sizes, A alignment size,
D2 = 2·D_lang, E embedding size, L caption length.
"""

from __future__ import annotations

from aligndraw.config import ModelConfig


def _linear(n_in: int, n_out: int) -> int:
    return 2 * n_in * n_out


def caption_flops(cfg: ModelConfig, caption_len: int, batch: int) -> dict[str, float]:
    """Per caption: bidirectional LSTM (input gates, recurrence) and (alignDRAW) the keys U h_lang."""
    d, d2 = cfg.lang_hidden, 2 * cfg.lang_hidden
    per_word = 2 * caption_len * _linear(cfg.embed_dim, 4 * d)
    table = 2 * cfg.vocab_size * _linear(cfg.embed_dim, 4 * d) / batch
    out = {"caption_input_gates": table if cfg.vocab_size <= batch * caption_len else per_word,
           "caption_recurrence": 2 * caption_len * _linear(d, 4 * d)}
    if cfg.model == "aligndraw":
        out["align_keys"] = caption_len * _linear(d2, cfg.align_dim)
    # W_s h_lang_j: the caption's share of the generative gates, once per word
    out["context_gates"] = caption_len * _linear(d2, 4 * cfg.dec_hidden)
    return out


def decoder_step_flops(cfg: ModelConfig, caption_len: int) -> dict[str, int]:
    """Per step, shared by training and sampling: generative LSTM, prior, alignment, write."""
    c, h, w, m = cfg.channels, cfg.height, cfg.width, cfg.write_n
    dd, a = cfg.dec_hidden, cfg.align_dim
    out = {
        # z_t and h_dec; s_t enters as Σ_j α_j (W_s h_lang_j), mixed below
        "dec_lstm": _linear(cfg.z_dim + dd, 4 * dd),
        "prior": _linear(dd, 2 * cfg.z_dim),
        "write_heads": _linear(dd, 5 + c * m * m),
        # F̂_yᵀ (H×M) · w (M×M), then · F̂_x (M×W), per channel
        "write_filter": c * (2 * h * m * m + 2 * h * m * w),
    }
    mix = 2 * caption_len * 4 * dd  # Σ_j α_j (W_s h_lang_j)
    if cfg.model == "aligndraw":
        # query W h_dec, scores vᵀ tanh(·) over L words, the gates' context mix
        out["alignment"] = _linear(dd, a) + 2 * caption_len * a + mix
    else:
        out["alignment"] = mix
    return out


def encoder_step_flops(cfg: ModelConfig) -> dict[str, int]:
    """Per training step only: read, inference LSTM, posterior."""
    c, h, w, n = cfg.channels, cfg.height, cfg.width, cfg.read_n
    de, dd = cfg.enc_hidden, cfg.dec_hidden
    read_size = 2 * c * n * n
    return {
        "read_head": _linear(dd, 5),
        # F_y (N×H) · x (H×W), then · F_xᵀ (W×N), for 2C images (x and x̂)
        "read_filter": 2 * c * (2 * n * h * w + 2 * n * w * n),
        "enc_lstm": _linear(read_size + dd + de, 4 * de),
        "posterior": _linear(de, 2 * cfg.z_dim),
    }


def flops_per_image(cfg: ModelConfig, caption_len: int, batch: int) -> dict[str, float]:
    """Matmul FLOPs for one image: ``train`` (forward + backward), ``forward``, ``sample``."""
    once = sum(caption_flops(cfg, caption_len, batch).values())
    dec = sum(decoder_step_flops(cfg, caption_len).values())
    enc = sum(encoder_step_flops(cfg).values())
    forward = once + cfg.steps * (dec + enc)
    return {"train": 3.0 * forward, "forward": float(forward),
            "sample": float(once + cfg.steps * dec)}
