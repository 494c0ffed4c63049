"""alignDRAW: a DRAW recurrent VAE conditioned on captions through soft word alignment.

Mansimov, Parisotto, Ba, Salakhutdinov, "Generating Images from Captions with Attention",
ICLR 2016 (arXiv 1511.02793); DRAW: Gregor et al., ICML 2015 (arXiv 1502.04623).

One drawing step (PAPER.md), t = 1..T:
    x̂_t = x − σ(c_{t−1});  r_t = read(x, x̂_t, h_dec_{t−1})
    h_enc_t = LSTM_enc(h_enc_{t−1}, [r_t, h_dec_{t−1}]);  z_t ~ Q = N(μ_t, σ_t)
    α_t, s_t = align(h_lang, h_dec_{t−1})
    h_dec_t = LSTM_dec(h_dec_{t−1}, [z_t, s_t]);  c_t = c_{t−1} + write(h_dec_t)
    prior for step t: N(0, I) at t = 1, else μ, log σ = tanh(linear(h_dec_{t−1}))

Speed: every linear map of h_dec (its share of both LSTMs' gates, the read and write heads,
the write patch, the alignment query and the prior) is one fused matmul per step; the
alignment keys U h_lang are computed once per caption. The parameters stay in the usual
modules (``nn.LSTMCell``, ``nn.Linear``) so they read like the paper and a naive per-module
reference can share them.

Symbols: B batch, L words, T steps, C/H/W image, N read grid, M write grid, Z latent,
De/Dd inference/generative LSTM size, A alignment size, D2 = 2·D_lang.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aligndraw import attention
from aligndraw.alignment import Alignment, align, mean_context
from aligndraw.config import ModelConfig
from aligndraw.language import CaptionEncoder, padding_mask
from aligndraw.losses import bernoulli_nll, gaussian_kl


@dataclass
class DrawLoss:
    """Terms of the negative lower bound, in nats.

    loss: () mean over the batch of nll + kl (what training minimises).
    nll: (B,) −log p(x | y, z). kl: (B,) Σ_t KL. kl_steps: (B, T) KL per step.
    """

    loss: Tensor
    nll: Tensor
    kl: Tensor
    kl_steps: Tensor

    @property
    def bound(self) -> Tensor:
        """(B,) −L per image, in nats (an upper bound on −log p(x | y))."""
        return self.nll + self.kl


@dataclass
class DrawSample:
    """What the model drew.

    images: (B, C, H, W) σ(c_T). canvases: (B, T+1, C, H, W) σ(c_t) for t = 0..T.
    alignments: (B, T, L) word weights per step. write_windows: (B, T, 4) write box
    (x0, y0, x1, y1) in pixels per step.
    """

    images: Tensor
    canvases: Tensor
    alignments: Tensor
    write_windows: Tensor


def lstm_update(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """LSTM cell update from pre-activations (gate order i, f, g, o as in ``nn.LSTMCell``).

    gates: (B, 4D), c: (B, D) → h, c: (B, D).
    """
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


@dataclass
class _Projection:
    """Fused linear map of h_dec: one weight, one bias, and the sizes of its parts."""

    weight: Tensor
    bias: Tensor
    names: tuple[str, ...]
    sizes: tuple[int, ...]

    def __call__(self, h_dec: Tensor) -> dict[str, Tensor]:
        out = F.linear(h_dec, self.weight, self.bias)  # (B, sum of sizes)
        return dict(zip(self.names, out.split(self.sizes, dim=-1), strict=True))


class AlignDraw(nn.Module):
    """The alignDRAW model. ``forward`` gives the bound's terms, ``sample`` draws from the prior."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = cfg = config
        c, n, m = cfg.channels, cfg.read_n, cfg.write_n
        self.read_size = 2 * c * n * n  # image and error-image glimpses
        self.encoder = CaptionEncoder(cfg.vocab_size, cfg.embed_dim, cfg.lang_hidden)
        lang_dim = self.encoder.out_dim
        self.alignment = (Alignment(lang_dim, cfg.dec_hidden, cfg.align_dim)
                          if cfg.model == "aligndraw" else None)
        self.enc_lstm = nn.LSTMCell(self.read_size + cfg.dec_hidden, cfg.enc_hidden)
        self.dec_lstm = nn.LSTMCell(cfg.z_dim + lang_dim, cfg.dec_hidden)
        self.posterior = nn.Linear(cfg.enc_hidden, 2 * cfg.z_dim)  # μ, log σ of Q
        self.prior = nn.Linear(cfg.dec_hidden, 2 * cfg.z_dim)  # tanh → μ, log σ of P
        self.read_head = nn.Linear(cfg.dec_hidden, 5)
        self.write_head = nn.Linear(cfg.dec_hidden, 5)
        self.write_patch = nn.Linear(cfg.dec_hidden, c * m * m)
        self.h_enc0 = nn.Parameter(torch.zeros(cfg.enc_hidden))
        self.c_enc0 = nn.Parameter(torch.zeros(cfg.enc_hidden))
        self.h_dec0 = nn.Parameter(torch.zeros(cfg.dec_hidden))
        self.c_dec0 = nn.Parameter(torch.zeros(cfg.dec_hidden))
        self.canvas0 = nn.Parameter(torch.zeros(c, cfg.height, cfg.width))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weights ~ N(0, init_std²), biases and initial states 0, c_0 = canvas_init."""
        for name, p in self.named_parameters():
            if name.rsplit(".", 1)[-1].startswith("weight"):
                nn.init.normal_(p, 0.0, self.config.init_std)
            else:
                nn.init.zeros_(p)
        nn.init.constant_(self.canvas0, self.config.canvas_init)

    # ----------------------------------------------------------------------------- helpers
    def _projection(self, with_encoder: bool) -> _Projection:
        """Stack every linear map of h_dec into one weight (built once per call of forward)."""
        parts: list[tuple[str, Tensor, Tensor | None]] = [
            ("write", self.write_head.weight, self.write_head.bias),
            ("patch", self.write_patch.weight, self.write_patch.bias),
            ("dec", self.dec_lstm.weight_hh, self.dec_lstm.bias_ih + self.dec_lstm.bias_hh),
            ("prior", self.prior.weight, self.prior.bias),
        ]
        if self.alignment is not None:
            parts.append(("query", self.alignment.W.weight, None))
        if with_encoder:
            enc = self.enc_lstm
            parts += [("read", self.read_head.weight, self.read_head.bias),
                      ("enc", enc.weight_ih[:, self.read_size:], enc.bias_ih + enc.bias_hh)]
        weight = torch.cat([w for _, w, _ in parts])
        bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for _, w, b in parts])
        return _Projection(weight, bias, tuple(p[0] for p in parts),
                           tuple(w.shape[0] for _, w, _ in parts))

    def _initial_state(self, batch: int) -> dict[str, Tensor]:
        return {
            "h_enc": self.h_enc0.expand(batch, -1), "c_enc": self.c_enc0.expand(batch, -1),
            "h_dec": self.h_dec0.expand(batch, -1), "c_dec": self.c_dec0.expand(batch, -1),
            "canvas": self.canvas0.expand(batch, -1, -1, -1),
        }

    def encode_captions(self, tokens: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Caption states, alignment keys (empty for noalign) and padding mask.

        Returns h_lang (B, L, D2), keys (B, L, A) or empty, mask (B, L).
        """
        h_lang = self.encoder(tokens, lengths)
        mask = padding_mask(lengths, tokens.shape[1])
        keys = self.alignment.keys(h_lang) if self.alignment is not None else h_lang[..., :0]
        return h_lang, keys, mask

    def _context(self, keys: Tensor, query: Tensor | None, h_lang: Tensor,
                 mask: Tensor) -> tuple[Tensor, Tensor]:
        if self.alignment is None:
            return mean_context(h_lang, mask)
        return align(keys, query, self.alignment.v.weight[0], h_lang, mask)

    def _write(self, proj: dict[str, Tensor]) -> tuple[Tensor, attention.Window]:
        cfg = self.config
        window = attention.window_params(proj["write"], cfg.height, cfg.width, cfg.write_n)
        f_x, f_y = attention.filterbanks(window, cfg.height, cfg.width, cfg.write_n, cfg.filter_eps)
        patch = proj["patch"].view(-1, cfg.channels, cfg.write_n, cfg.write_n)  # (B, C, M, M)
        return attention.write(patch, f_x, f_y, window.gamma), window

    def _read(self, images: Tensor, error: Tensor, params: Tensor) -> Tensor:
        cfg = self.config
        window = attention.window_params(params, cfg.height, cfg.width, cfg.read_n)
        f_x, f_y = attention.filterbanks(window, cfg.height, cfg.width, cfg.read_n, cfg.filter_eps)
        both = torch.cat([images, error], dim=1)  # (B, 2C, H, W)
        return attention.read(both, f_x, f_y, window.gamma).flatten(1)  # (B, 2C·N·N)

    def _prior(self, proj: dict[str, Tensor], step: int) -> tuple[Tensor, Tensor]:
        if step == 0:  # P(z_1) = N(0, I)
            zeros = proj["prior"].new_zeros(proj["prior"].shape[0], self.config.z_dim)
            return zeros, zeros
        mu, log_sigma = torch.tanh(proj["prior"]).chunk(2, dim=-1)
        return mu, log_sigma

    def _noise(self, noise: Tensor | None, batch: int, like: Tensor,
               generator: torch.Generator | None) -> Tensor:
        shape = (batch, self.config.steps, self.config.z_dim)
        if noise is not None:
            if tuple(noise.shape) != shape:
                raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
            return noise.to(like)
        device = generator.device if generator is not None else like.device
        return torch.randn(shape, generator=generator, device=device).to(like)

    # ----------------------------------------------------------------------------- training
    def forward(self, images: Tensor, tokens: Tensor, lengths: Tensor,
                generator: torch.Generator | None = None, noise: Tensor | None = None) -> DrawLoss:
        """Negative lower bound of log p(x | y) with one posterior sample.

        Args:
            images: (B, C, H, W) in [0, 1]. tokens: (B, L) word ids. lengths: (B,).
            generator: source of the posterior noise ε. noise: (B, T, Z) ε to use instead.

        Returns:
            ``DrawLoss`` with loss, nll (B,), kl (B,), kl_steps (B, T).
        """
        b = images.shape[0]
        h_lang, keys, mask = self.encode_captions(tokens, lengths)
        eps = self._noise(noise, b, images, generator)
        proj_fn = self._projection(with_encoder=True)
        enc = self.enc_lstm
        w_enc = torch.cat([enc.weight_ih[:, : self.read_size], enc.weight_hh], dim=1)
        st = self._initial_state(b)
        proj = proj_fn(st["h_dec"])
        kl_steps = []
        for t in range(self.config.steps):
            error = images - torch.sigmoid(st["canvas"])  # x̂_t
            r = self._read(images, error, proj["read"])
            gates = proj["enc"] + F.linear(torch.cat([r, st["h_enc"]], dim=1), w_enc)
            st["h_enc"], st["c_enc"] = lstm_update(gates, st["c_enc"])
            mu_q, log_sigma_q = self.posterior(st["h_enc"]).chunk(2, dim=-1)
            z = mu_q + log_sigma_q.exp() * eps[:, t]
            kl_steps.append(gaussian_kl(mu_q, log_sigma_q, *self._prior(proj, t)))
            st = self._decode(st, proj, z, keys, h_lang, mask)[0]
            proj = proj_fn(st["h_dec"])
            st["canvas"] = st["canvas"] + self._write(proj)[0]
        nll = bernoulli_nll(st["canvas"], images)
        kl_steps_t = torch.stack(kl_steps, dim=1)  # (B, T)
        kl = kl_steps_t.sum(1)
        return DrawLoss(loss=(nll + kl).mean(), nll=nll, kl=kl, kl_steps=kl_steps_t)

    def _decode(self, st: dict[str, Tensor], proj: dict[str, Tensor], z: Tensor, keys: Tensor,
                h_lang: Tensor, mask: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Alignment and generative LSTM update; returns the new state and α_t (B, L)."""
        alpha, s = self._context(keys, proj.get("query"), h_lang, mask)
        gates = proj["dec"] + F.linear(torch.cat([z, s], dim=1), self.dec_lstm.weight_ih)
        st = dict(st)
        st["h_dec"], st["c_dec"] = lstm_update(gates, st["c_dec"])
        return st, alpha

    # ----------------------------------------------------------------------------- generation
    @torch.no_grad()
    def sample(self, tokens: Tensor, lengths: Tensor, generator: torch.Generator | None = None,
               noise: Tensor | None = None) -> DrawSample:
        """Draw images from the learned prior, without the inference network.

        Args:
            tokens: (B, L) word ids. lengths: (B,). generator: source of z. noise: (B, T, Z).

        Returns:
            ``DrawSample`` with images, canvases, alignments and write windows.
        """
        cfg = self.config
        b = tokens.shape[0]
        h_lang, keys, mask = self.encode_captions(tokens, lengths)
        eps = self._noise(noise, b, h_lang, generator)
        proj_fn = self._projection(with_encoder=False)
        st = self._initial_state(b)
        proj = proj_fn(st["h_dec"])
        canvases, alphas, boxes = [torch.sigmoid(st["canvas"])], [], []
        for t in range(cfg.steps):
            mu_p, log_sigma_p = self._prior(proj, t)
            z = mu_p + log_sigma_p.exp() * eps[:, t]
            st, alpha = self._decode(st, proj, z, keys, h_lang, mask)
            proj = proj_fn(st["h_dec"])
            update, window = self._write(proj)
            st["canvas"] = st["canvas"] + update
            canvases.append(torch.sigmoid(st["canvas"]))
            alphas.append(alpha)
            boxes.append(attention.window_box(window, cfg.write_n))
        canvases_t = torch.stack(canvases, dim=1)  # (B, T+1, C, H, W)
        return DrawSample(images=canvases_t[:, -1], canvases=canvases_t,
                          alignments=torch.stack(alphas, dim=1),  # (B, T, L)
                          write_windows=torch.stack(boxes, dim=1))  # (B, T, 4)
