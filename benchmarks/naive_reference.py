"""A plain, per-step alignDRAW: the baseline that the throughput benchmark compares against.

This is the model of PAPER.md written the way a straightforward PyTorch implementation would
be, independently of ``aligndraw.model``: an ``nn.Embedding`` + packed bidirectional ``nn.LSTM``
caption encoder, ``nn.LSTMCell`` encoder and decoder called once per step on ``torch.cat``
inputs, a separate ``nn.Linear`` for every head, alignment keys U h_lang recomputed at every
step, filterbanks built per step with plain tensor ops, fp32. It is deliberately not optimised:
its speed is the "naive" figure in ``throughput.py``, and its outputs are the reference that
``tests/test_benchmarks.py`` checks the library model against.

Parameters have the library's shapes under their own names; ``load_from_library`` copies an
``AlignDraw``'s weights in (``parameter_map`` gives the name mapping), so both compute the same
function and can be compared loss for loss and gradient for gradient.

Symbols: B batch, L words, T steps, C/H/W image, N read grid, M write grid, Z latent,
De/Dd inference/generative LSTM size, A alignment size, D2 = 2·D_lang.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from aligndraw.config import ModelConfig


@dataclass
class NaiveLoss:
    """Same fields as ``aligndraw.model.DrawLoss``: loss (), nll (B,), kl (B,), kl_steps (B, T)."""

    loss: Tensor
    nll: Tensor
    kl: Tensor
    kl_steps: Tensor


@dataclass
class NaiveSample:
    """Same fields as ``aligndraw.model.DrawSample``.

    images (B, C, H, W), canvases (B, T+1, C, H, W), alignments (B, T, L), write_windows (B, T, 4).
    """

    images: Tensor
    canvases: Tensor | None
    alignments: Tensor
    write_windows: Tensor


# --------------------------------------------------------------------------- attention, plainly
def gaussian_filters(g: Tensor, delta: Tensor, sigma2: Tensor, size: int, n: int, eps: float) -> Tensor:
    """F[b, i, a] = exp(−(a − μ_i)² / 2σ²) / (Σ_a … + eps), pixels a = 1..size (DRAW eqs. 19–26).

    g, delta, sigma2: (B,). Returns (B, N, size).
    """
    i = torch.arange(1, n + 1, dtype=g.dtype, device=g.device)
    mu = g.unsqueeze(1) + (i - n / 2 - 0.5).unsqueeze(0) * delta.unsqueeze(1)  # (B, N)
    a = torch.arange(1, size + 1, dtype=g.dtype, device=g.device)
    dist2 = (a.view(1, 1, -1) - mu.unsqueeze(2)) ** 2  # (B, N, size)
    f = torch.exp(-dist2 / (2 * sigma2.view(-1, 1, 1)))
    return f / (f.sum(dim=2, keepdim=True) + eps)


def attention_window(params: Tensor, height: int, width: int, n: int, eps: float):
    """Five raw numbers → (F_x (B, N, W), F_y (B, N, H), γ (B,), g_x, g_y, δ) (DRAW eqs. 21–24)."""
    gx_t, gy_t, log_sigma2, log_delta, log_gamma = params[:, 0], params[:, 1], params[:, 2], \
        params[:, 3], params[:, 4]
    g_x = (width + 1) / 2 * (gx_t + 1)
    g_y = (height + 1) / 2 * (gy_t + 1)
    delta = (max(height, width) - 1) / (n - 1) * torch.exp(log_delta)
    sigma2 = torch.exp(log_sigma2)
    f_x = gaussian_filters(g_x, delta, sigma2, width, n, eps)
    f_y = gaussian_filters(g_y, delta, sigma2, height, n, eps)
    return f_x, f_y, torch.exp(log_gamma), g_x, g_y, delta


def gauss_kl(mu_q: Tensor, log_sigma_q: Tensor, mu_p: Tensor, log_sigma_p: Tensor) -> Tensor:
    """½ Σ [2 log σ_p − 2 log σ_q + (σ_q² + (μ_q − μ_p)²)/σ_p² − 1] over the last dim → (B,)."""
    var_q, var_p = torch.exp(2 * log_sigma_q), torch.exp(2 * log_sigma_p)
    terms = 2 * log_sigma_p - 2 * log_sigma_q + (var_q + (mu_q - mu_p) ** 2) / var_p - 1
    return 0.5 * terms.sum(dim=1)


# --------------------------------------------------------------------------- the model
class NaiveAlignDraw(nn.Module):
    """alignDRAW, one module call per head per step. Same ``forward``/``sample`` as ``AlignDraw``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = cfg = config
        c, n, m = cfg.channels, cfg.read_n, cfg.write_n
        lang_dim = 2 * cfg.lang_hidden
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=0)
        self.caption_rnn = nn.LSTM(cfg.embed_dim, cfg.lang_hidden, batch_first=True, bidirectional=True)
        self.caption_h0 = nn.Parameter(torch.zeros(2, 1, cfg.lang_hidden))
        self.caption_c0 = nn.Parameter(torch.zeros(2, 1, cfg.lang_hidden))
        if cfg.model == "aligndraw":
            self.align_U = nn.Linear(lang_dim, cfg.align_dim)  # carries the bias b
            self.align_W = nn.Linear(cfg.dec_hidden, cfg.align_dim, bias=False)
            self.align_v = nn.Linear(cfg.align_dim, 1, bias=False)
        self.enc_cell = nn.LSTMCell(2 * c * n * n + cfg.dec_hidden, cfg.enc_hidden)  # [r, h_dec]
        self.dec_cell = nn.LSTMCell(cfg.z_dim + lang_dim, cfg.dec_hidden)  # [z, s]
        self.q_head = nn.Linear(cfg.enc_hidden, 2 * cfg.z_dim)
        self.p_head = nn.Linear(cfg.dec_hidden, 2 * cfg.z_dim)
        self.read_params = nn.Linear(cfg.dec_hidden, 5)
        self.write_params = nn.Linear(cfg.dec_hidden, 5)
        self.write_values = nn.Linear(cfg.dec_hidden, c * m * m)
        self.h_enc_init = nn.Parameter(torch.zeros(cfg.enc_hidden))
        self.c_enc_init = nn.Parameter(torch.zeros(cfg.enc_hidden))
        self.h_dec_init = nn.Parameter(torch.zeros(cfg.dec_hidden))
        self.c_dec_init = nn.Parameter(torch.zeros(cfg.dec_hidden))
        self.canvas_init = nn.Parameter(torch.full((c, cfg.height, cfg.width), cfg.canvas_init))

    # ----------------------------------------------------------------------- pieces
    def encode_caption(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """(B, L) ids → h_lang (B, L, D2), zero past each caption's end."""
        b, max_len = tokens.shape
        packed = pack_padded_sequence(self.embed(tokens), lengths.cpu(), batch_first=True,
                                      enforce_sorted=False)
        h0 = self.caption_h0.repeat(1, b, 1)
        c0 = self.caption_c0.repeat(1, b, 1)
        out, _ = self.caption_rnn(packed, (h0, c0))
        h_lang, _ = pad_packed_sequence(out, batch_first=True, total_length=max_len)
        return h_lang

    def context(self, h_lang: Tensor, mask: Tensor, h_dec: Tensor) -> tuple[Tensor, Tensor]:
        """α_t (B, L) and s_t (B, D2) from h_dec_{t−1}; U h_lang is recomputed every call."""
        if self.config.model == "aligndraw":
            e = self.align_v(torch.tanh(self.align_U(h_lang) + self.align_W(h_dec).unsqueeze(1)))
            e = e.squeeze(2).masked_fill(~mask, float("-inf"))  # (B, L)
            alpha = torch.softmax(e, dim=1)
        else:
            alpha = mask.to(h_lang.dtype) / mask.sum(dim=1, keepdim=True).to(h_lang.dtype)
        s = torch.bmm(alpha.unsqueeze(1), h_lang).squeeze(1)  # (B, D2)
        return alpha, s

    def read(self, images: Tensor, error: Tensor, h_dec: Tensor) -> Tensor:
        """Two γ · F_y x F_xᵀ glimpses, flattened as [image channels, error channels] → (B, 2C·N·N)."""
        cfg = self.config
        f_x, f_y, gamma, *_ = attention_window(self.read_params(h_dec), cfg.height, cfg.width,
                                               cfg.read_n, cfg.filter_eps)
        glimpses = []
        for source in (images, error):
            g = f_y.unsqueeze(1) @ source @ f_x.transpose(1, 2).unsqueeze(1)  # (B, C, N, N)
            glimpses.append((g * gamma.view(-1, 1, 1, 1)).flatten(1))
        return torch.cat(glimpses, dim=1)

    def write(self, h_dec: Tensor) -> tuple[Tensor, Tensor]:
        """Canvas update (1/γ) F_yᵀ w F_x (B, C, H, W) and the write box (B, 4)."""
        cfg = self.config
        f_x, f_y, gamma, g_x, g_y, delta = attention_window(self.write_params(h_dec), cfg.height,
                                                            cfg.width, cfg.write_n, cfg.filter_eps)
        w = self.write_values(h_dec).view(-1, cfg.channels, cfg.write_n, cfg.write_n)
        update = f_y.transpose(1, 2).unsqueeze(1) @ w @ f_x.unsqueeze(1)  # (B, C, H, W)
        half = cfg.write_n * delta / 2
        box = torch.stack([g_x - half - 1, g_y - half - 1, g_x + half - 1, g_y + half - 1], dim=1)
        return update / gamma.view(-1, 1, 1, 1), box

    def prior(self, h_dec: Tensor, t: int) -> tuple[Tensor, Tensor]:
        """μ, log σ of P(z_t): N(0, I) at the first step, then tanh(linear(h_dec_{t−1}))."""
        if t == 0:
            zeros = torch.zeros(h_dec.shape[0], self.config.z_dim, dtype=h_dec.dtype, device=h_dec.device)
            return zeros, zeros
        out = torch.tanh(self.p_head(h_dec))
        return out[:, : self.config.z_dim], out[:, self.config.z_dim:]

    def make_noise(self, noise: Tensor | None, batch: int, like: Tensor,
                   generator: torch.Generator | None) -> Tensor:
        """ε (B, T, Z), drawn the same way as the library model so one generator gives one ε."""
        if noise is not None:
            return noise.to(like)
        device = generator.device if generator is not None else like.device
        shape = (batch, self.config.steps, self.config.z_dim)
        return torch.randn(shape, generator=generator, device=device).to(like)

    def initial_state(self, b: int):
        return (self.h_enc_init.expand(b, -1), self.c_enc_init.expand(b, -1),
                self.h_dec_init.expand(b, -1), self.c_dec_init.expand(b, -1),
                self.canvas_init.expand(b, -1, -1, -1))

    # ----------------------------------------------------------------------- training
    def forward(self, images: Tensor, tokens: Tensor, lengths: Tensor,
                generator: torch.Generator | None = None, noise: Tensor | None = None) -> NaiveLoss:
        """Negative lower bound with one posterior sample; see ``AlignDraw.forward``."""
        cfg = self.config
        b = images.shape[0]
        h_lang = self.encode_caption(tokens, lengths)
        mask = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0) < lengths.unsqueeze(1)
        eps = self.make_noise(noise, b, images, generator)
        h_enc, c_enc, h_dec, c_dec, canvas = self.initial_state(b)
        kls = []
        for t in range(cfg.steps):
            error = images - torch.sigmoid(canvas)
            r = self.read(images, error, h_dec)
            h_enc, c_enc = self.enc_cell(torch.cat([r, h_dec], dim=1), (h_enc, c_enc))
            q = self.q_head(h_enc)
            mu_q, log_sigma_q = q[:, : cfg.z_dim], q[:, cfg.z_dim:]
            z = mu_q + torch.exp(log_sigma_q) * eps[:, t]
            kls.append(gauss_kl(mu_q, log_sigma_q, *self.prior(h_dec, t)))
            _, s = self.context(h_lang, mask, h_dec)
            h_dec, c_dec = self.dec_cell(torch.cat([z, s], dim=1), (h_dec, c_dec))
            canvas = canvas + self.write(h_dec)[0]
        nll = F.binary_cross_entropy_with_logits(canvas, images, reduction="none").flatten(1).sum(1)
        kl_steps = torch.stack(kls, dim=1)
        kl = kl_steps.sum(1)
        return NaiveLoss(loss=(nll + kl).mean(), nll=nll, kl=kl, kl_steps=kl_steps)

    # ----------------------------------------------------------------------- generation
    @torch.no_grad()
    def sample(self, tokens: Tensor, lengths: Tensor, generator: torch.Generator | None = None,
               noise: Tensor | None = None, history: bool = True) -> NaiveSample:
        """Draw from the prior without the encoder; see ``AlignDraw.sample``."""
        cfg = self.config
        b = tokens.shape[0]
        h_lang = self.encode_caption(tokens, lengths)
        mask = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0) < lengths.unsqueeze(1)
        eps = self.make_noise(noise, b, h_lang, generator)
        _, _, h_dec, c_dec, canvas = self.initial_state(b)
        canvases, alphas, boxes = [torch.sigmoid(canvas)], [], []
        for t in range(cfg.steps):
            mu_p, log_sigma_p = self.prior(h_dec, t)
            z = mu_p + torch.exp(log_sigma_p) * eps[:, t]
            alpha, s = self.context(h_lang, mask, h_dec)
            h_dec, c_dec = self.dec_cell(torch.cat([z, s], dim=1), (h_dec, c_dec))
            update, box = self.write(h_dec)
            canvas = canvas + update
            if history:
                canvases.append(torch.sigmoid(canvas))
            alphas.append(alpha)
            boxes.append(box)
        canvases_t = torch.stack(canvases, dim=1) if history else None  # (B, T+1, C, H, W)
        return NaiveSample(images=torch.sigmoid(canvas), canvases=canvases_t,
                           alignments=torch.stack(alphas, dim=1), write_windows=torch.stack(boxes, dim=1))


# --------------------------------------------------------------------------- weight sharing
# Naive module/parameter name prefix → the library's (``AlignDraw``) name prefix.
_PREFIXES = {
    "embed.": "encoder.embedding.",
    "caption_rnn.": "encoder.lstm.",
    "caption_h0": "encoder.h0",
    "caption_c0": "encoder.c0",
    "align_U.": "alignment.U.",
    "align_W.": "alignment.W.",
    "align_v.": "alignment.v.",
    "enc_cell.": "enc_lstm.",
    "dec_cell.": "dec_lstm.",
    "q_head.": "posterior.",
    "p_head.": "prior.",
    "read_params.": "read_head.",
    "write_params.": "write_head.",
    "write_values.": "write_patch.",
    "h_enc_init": "h_enc0",
    "c_enc_init": "c_enc0",
    "h_dec_init": "h_dec0",
    "c_dec_init": "c_dec0",
    "canvas_init": "canvas0",
}


def parameter_map(naive: NaiveAlignDraw) -> dict[str, str]:
    """{naive parameter name: library parameter name} for every naive parameter."""
    mapping = {}
    for name, _ in naive.named_parameters():
        prefix = next(p for p in _PREFIXES if name.startswith(p))
        mapping[name] = _PREFIXES[prefix] + name[len(prefix):]
    return mapping


def _strip_wrappers(name: str) -> str:
    for wrapper in ("_orig_mod.", "module."):
        name = name.replace(wrapper, "")
    return name


@torch.no_grad()
def load_from_library(naive: NaiveAlignDraw, lib_model: nn.Module) -> NaiveAlignDraw:
    """Copy an ``AlignDraw``'s parameters into ``naive`` (same shapes, mapped names).

    Raises ``ValueError`` when a parameter is missing on either side or shapes differ, so a
    change to the library's layout cannot pass unnoticed. Returns ``naive``.
    """
    lib = {_strip_wrappers(k): v for k, v in lib_model.named_parameters()}
    mapping = parameter_map(naive)
    unmapped = sorted(set(lib) - set(mapping.values()))
    if unmapped:
        raise ValueError(f"library parameters without a naive counterpart: {unmapped}")
    for name, p in naive.named_parameters():
        source = lib.get(mapping[name])
        if source is None:
            raise ValueError(f"library model has no parameter {mapping[name]!r} (for {name!r})")
        if source.shape != p.shape:
            raise ValueError(f"{name}: shape {tuple(p.shape)} ≠ library {mapping[name]} "
                             f"{tuple(source.shape)}")
        p.copy_(source)
    return naive


@torch.no_grad()
def perturb_parameters_(model: nn.Module, generator: torch.Generator, scale: float = 0.5) -> nn.Module:
    """Move every parameter away from the tiny N(0, 0.01²) init so every path carries signal.

    At the paper's init the alignment and attention gradients are ~1e-15 (rounding noise), so an
    equivalence check there proves little. Tensors of 2+ dims get N(0, (scale/√last_dim)²) added
    (for weights that is the fan-in, so LSTM gates stay out of saturation at any width); vectors
    (biases, initial states) get N(0, (scale/2)²).
    """
    for p in model.parameters():
        std = scale / p.shape[-1] ** 0.5 if p.dim() >= 2 else scale / 2
        p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) * std)
    return model
