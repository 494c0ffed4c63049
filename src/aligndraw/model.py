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
alignment keys U h_lang and the caption's share of the generative gates, W_s h_lang (mixed
by α_t each step: W_s s_t = Σ_j α_j W_s h_lang_j), are computed once per caption. The
parameters stay in the usual modules (``nn.LSTMCell``, ``nn.Linear``) so they read like the
paper and a naive per-module reference can share them.

Symbols: B batch, L words, T steps, C/H/W image, N read grid, M write grid, Z latent,
De/Dd inference/generative LSTM size, A alignment size, D2 = 2·D_lang.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from aligndraw import attention, gemm, step_kernels
from aligndraw.alignment import (
    Alignment,
    factored_align_weights,
    key_factors,
    masked_softmax,
    uniform_weights,
)
from aligndraw.config import ModelConfig
from aligndraw.language import CaptionEncoder, lstm_update, padding_mask, sigmoid_tanh
from aligndraw.losses import bernoulli_nll, gaussian_kl, gaussian_log_prob
from aligndraw.recurrent_linear import StepLinear, StepMix
from aligndraw.sentence_vectors import SentenceVectorEncoder


@dataclass
class DrawLoss:
    """Terms of the negative lower bound, in nats.

    loss: () mean over the batch of nll + kl (what training minimises).
    nll: (B,) −log p(x | y, z). kl: (B,) Σ_t KL. kl_steps: (B, T) KL per step.
    log_weight: (B,) importance weight of the posterior sample (for the IWAE bound).
    """

    loss: Tensor
    nll: Tensor
    kl: Tensor
    kl_steps: Tensor
    log_weight: Tensor | None = None  # (B,) log p(x, z | y) − log q(z | x, y), if asked for

    @property
    def bound(self) -> Tensor:
        """(B,) −L per image, in nats (an upper bound on −log p(x | y))."""
        return self.nll + self.kl

    @classmethod
    def of(cls, nll: Tensor, kl: Tensor, kl_steps: Tensor, log_weight: Tensor | None = None) -> DrawLoss:
        """The terms with ``loss`` their batch mean: nll, kl (B,), kl_steps (B, T)."""
        return cls(loss=(nll + kl).mean(), nll=nll, kl=kl, kl_steps=kl_steps, log_weight=log_weight)


@dataclass
class DrawSample:
    """What the model drew.

    images: (B, C, H, W) σ(c_T). canvases: (B, T+1, C, H, W) σ(c_t) for t = 0..T, or None
    when sampled with ``history=False``. alignments: (B, T, L) word weights per step.
    write_windows: (B, T, 4) write box (x0, y0, x1, y1) in pixels per step.
    """

    images: Tensor
    canvases: Tensor | None
    alignments: Tensor
    write_windows: Tensor


MAX_TEMPERATURE = 10.0
# query2 = 2·W h_dec (B, A) or None → (α_t (B, L), W_s s_t (B, 4·Dd)); see ``AlignDraw._context_step``
ContextStep = Callable[[Tensor | None], tuple[Tensor, Tensor]]


def check_temperature(temperature: float) -> float:
    """A sampling temperature τ ≥ 0 (z = μ + τ·σ·ε; 1 is the paper's sampling), as a float."""
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
            or not 0.0 <= float(temperature) <= MAX_TEMPERATURE):
        raise ValueError(f"temperature must be a number between 0 and {MAX_TEMPERATURE:g} (1 "
                         "samples the learned prior as trained, 0 takes its mean at every step), "
                         f"got {temperature!r}")
    return float(temperature)


def standard_noise(shape: tuple[int, ...], noise: Tensor | None, like: Tensor,
                   generator: torch.Generator | None) -> Tensor:
    """The given ``noise`` (checked against ``shape``) or a fresh N(0, I) draw from
    ``generator``, with ``like``'s dtype and device."""
    if noise is not None:
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
        return noise.to(like)
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device).to(like)


@dataclass
class _Attention:
    """A window's intensity γ (B,) and its filterbanks F_x (B, n, W), F_y (B, n, H)."""

    gamma: Tensor
    f_x: Tensor
    f_y: Tensor


@dataclass
class _Projection:
    """Fused linear map of h_dec: one shared-step linear and the names and sizes of its parts."""

    linear: StepLinear
    names: tuple[str, ...]
    sizes: tuple[int, ...]

    def __call__(self, h_dec: Tensor) -> dict[str, Tensor]:
        out = self.linear(h_dec)  # (B, sum of sizes)
        return dict(zip(self.names, out.split(self.sizes, dim=-1), strict=True))


class AlignDraw(nn.Module):
    """The alignDRAW model. ``forward`` gives the bound's terms, ``sample`` draws from the prior."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = cfg = config
        c, n, m = cfg.channels, cfg.read_n, cfg.write_n
        self.read_size = 2 * c * n * n  # image and error-image glimpses
        self.encoder: CaptionEncoder | SentenceVectorEncoder
        if cfg.model == "sentvec":  # frozen; trained apart (aligndraw.sentence_vectors)
            self.encoder = SentenceVectorEncoder(cfg.vocab_size, cfg.sentence_dim)
        else:
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
        if cfg.model == "sentvec":
            self.encoder.requires_grad_(False)

    def noise_shape(self, batch: int) -> tuple[int, int, int]:
        """Shape (B, T, Z) of the standard-normal noise ``forward`` and ``sample`` take."""
        return (batch, self.config.steps, self.config.z_dim)

    def reset_parameters(self) -> None:
        """Weights ~ N(0, init_std²), biases and initial states 0, c_0 = canvas_init."""
        for name, p in self.named_parameters():
            if name.rsplit(".", 1)[-1].startswith("weight"):
                nn.init.normal_(p, 0.0, self.config.init_std)
            else:
                nn.init.zeros_(p)
        nn.init.constant_(self.canvas0, self.config.canvas_init)

    # ----------------------------------------------------------------------------- helpers
    def _projection(self, with_encoder: bool, with_write: bool = True,
                    with_step: bool = True) -> _Projection:
        """Stack every linear map of h_dec into one weight (built once per call of forward).

        ``with_write=False`` leaves out the write head and patch (``sample`` writes after the
        loop); ``with_step=False`` keeps only those (all that h_dec_T is used for) and leaves
        out what feeds a next step: the generative gates, prior, query, read head and
        inference gates.
        """
        parts: list[tuple[str, Tensor, Tensor | None]] = [
            ("write", self.write_head.weight, self.write_head.bias),
            ("patch", self.write_patch.weight, self.write_patch.bias),
        ] if with_write else []
        if with_step:
            parts += [
                ("dec", self.dec_lstm.weight_hh, self.dec_lstm.bias_ih + self.dec_lstm.bias_hh),
                ("prior", self.prior.weight, self.prior.bias),
            ]
        if with_step and self.alignment is not None:
            # 2·W: the alignment takes its query doubled (``factored_align_weights``); exact.
            parts.append(("query2", 2 * self.alignment.W.weight, None))
        if with_step and with_encoder:
            enc = self.enc_lstm
            parts += [("read", self.read_head.weight, self.read_head.bias),
                      ("enc", enc.weight_ih[:, self.read_size:], enc.bias_ih + enc.bias_hh)]
        weight = torch.cat([w for _, w, _ in parts])
        bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for _, w, b in parts])
        return _Projection(StepLinear(weight, bias), tuple(p[0] for p in parts),
                           tuple(w.shape[0] for _, w, _ in parts))

    def _initial_state(self, batch: int) -> dict[str, Tensor]:
        return {
            "h_enc": self.h_enc0.expand(batch, -1), "c_enc": self.c_enc0.expand(batch, -1),
            "h_dec": self.h_dec0.expand(batch, -1), "c_dec": self.c_dec0.expand(batch, -1),
            "canvas": self.canvas0.expand(batch, -1, -1, -1),
        }

    def encode_captions(self, tokens: Tensor, lengths: Tensor,
                        h_lang: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Caption states, alignment keys (empty for noalign) and padding mask.

        Returns h_lang (B, L, D2), keys (B, L, A) or empty, mask (B, L). A given ``h_lang``
        is used as is instead of running the encoder.
        """
        if h_lang is None:
            h_lang = self.encoder(tokens, lengths)
        mask = padding_mask(lengths, tokens.shape[1])
        keys = self.alignment.keys(h_lang) if self.alignment is not None else h_lang[..., :0]
        return h_lang, keys, mask

    def _context_step(self, keys: Tensor, ctx: Tensor, mask: Tensor) -> ContextStep:
        """A function query2 = 2·W h_dec (B, A) or None → (α_t (B, L), W_s s_t (B, 4Dd)) for one step.

        ``ctx``: ``context_gates``. Without an alignment (noalignDRAW, sentvec) the weights are
        uniform and the result is the same at every step, so it is computed here, once.
        """
        # At least fp32, also under autocast (StepMix keeps the values' dtype): faster on CPU
        # than a bf16 mix, and the L-word sum keeps its precision; α_t is fp32 anyway.
        mixer = StepMix(ctx.to(torch.promote_types(ctx.dtype, torch.float32)))

        def mix(alpha: Tensor) -> tuple[Tensor, Tensor]:
            return alpha, mixer(alpha)  # (B, L) → (B, 4Dd)

        if self.alignment is None:
            fixed = mix(uniform_weights(mask, mixer.values.dtype))
            return lambda query: fixed
        v = self.alignment.v.weight[0]
        keys2 = 2 * keys  # (B, L, A), once per caption
        factors = key_factors(keys2)  # e^(−2k)
        if step_kernels.usable(factors, v, mixer.values):  # no gradients: one op a step
            values = mixer.values
            return lambda query2: step_kernels.context(factors, query2, v, mask, values)
        if step_kernels.differentiable(factors, v, mixer.values):  # the scores and their gradient in C++
            return lambda query2: mix(masked_softmax(step_kernels.scores(keys2, factors, query2, v), mask))
        return lambda query2: mix(factored_align_weights(keys2, factors, query2, v, mask))

    def context_gates(self, h_lang: Tensor) -> Tensor:
        """(B, L, D2) → (B, L, 4·Dd): W_s h_lang_j, every word's share of the generative gates.

        The generative LSTM sees s_t only through W_s s_t = Σ_j α_j (W_s h_lang_j), so this is
        computed once per caption (like the alignment keys) and each step mixes it with α_t:
        L·D2 products per caption instead of D2 per step and image (T = 32 > L).
        """
        return gemm.linear(h_lang, self.dec_lstm.weight_ih[:, self.config.z_dim:])  # (B, L, 4Dd)

    def _attention(self, proj: dict[str, Tensor], write: bool = True,
                   read: bool = True) -> tuple[_Attention | None, _Attention | None]:
        """This step's write window and the next step's read window, as asked for.

        Both come from the same projection of h_dec_t, so where their grids are the same size
        their filterbanks are built in one call (``attention.attend``).
        """
        cfg = self.config
        wanted = {name: n for name, n, on in (("write", cfg.write_n, write), ("read", cfg.read_n, read))
                  if on}
        atts = {}
        for n in sorted(set(wanted.values())):
            names = [name for name, size in wanted.items() if size == n]
            banks = attention.attend([proj[name] for name in names], cfg.height, cfg.width, n, cfg.filter_eps)
            atts.update({name: _Attention(*b) for name, b in zip(names, banks, strict=True)})
        return atts.get("write"), atts.get("read")

    def _write_onto(self, canvas: Tensor, proj: dict[str, Tensor], att: _Attention) -> Tensor:
        cfg = self.config
        patch = proj["patch"].view(-1, cfg.channels, cfg.write_n, cfg.write_n)  # (B, C, M, M)
        return attention.write_onto(canvas, patch, att.f_x, att.f_y, att.gamma)

    def _read(self, images: Tensor, canvas_prob: Tensor, att: _Attention) -> Tensor:
        """r_t = [read(x), read(x̂_t)] with x̂_t = x − σ(c_{t−1}); (B, 2C·N·N).

        Reading is linear, so read(x̂) = read(x) − read(σ(c)): the H×W error image is never
        formed (saves two full-image operations per step, forward and backward).
        """
        gamma = att.gamma
        glimpse_x = attention.read(images, att.f_x, att.f_y, gamma)  # (B, C, N, N)
        glimpse_c = attention.read(canvas_prob, att.f_x, att.f_y, gamma)
        return torch.cat([glimpse_x, glimpse_x - glimpse_c], dim=1).flatten(1)  # (B, 2C·N·N)

    def _prior(self, proj: dict[str, Tensor], step: int) -> tuple[Tensor, Tensor]:
        if step == 0:  # P(z_1) = N(0, I)
            zeros = proj["prior"].new_zeros(()).expand(proj["prior"].shape[0], self.config.z_dim)
            return zeros, zeros
        mu, log_sigma = sigmoid_tanh(proj["prior"]).chunk(2, dim=-1)
        return mu, log_sigma

    def _noise(self, noise: Tensor | None, batch: int, like: Tensor,
               generator: torch.Generator | None) -> Tensor:
        return standard_noise(self.noise_shape(batch), noise, like, generator)

    # ----------------------------------------------------------------------------- training
    def forward(self, images: Tensor, tokens: Tensor, lengths: Tensor,
                generator: torch.Generator | None = None, noise: Tensor | None = None,
                h_lang: Tensor | None = None, log_weight: bool = False) -> DrawLoss:
        """Negative lower bound of log p(x | y) with one posterior sample.

        Args:
            images: (B, C, H, W) in [0, 1]. tokens: (B, L) word ids. lengths: (B,).
            generator: source of the posterior noise ε. noise: (B, T, Z) ε to use instead.
            h_lang: (B, L, D2) caption states to use instead of encoding ``tokens`` (e.g. the
                mean sentence representation ȳ for retrieval); ``tokens`` then only gives L.
            log_weight: also return log p(x, z | y) − log q(z | x, y) per image.

        Returns:
            ``DrawLoss`` with loss, nll (B,), kl (B,), kl_steps (B, T) and maybe log_weight.
        """
        b = images.shape[0]
        h_lang, keys, mask = self.encode_captions(tokens, lengths, h_lang)
        eps = self._noise(noise, b, images, generator)
        proj_fn = self._projection(with_encoder=True)
        last_fn = self._projection(with_encoder=False, with_step=False)  # h_dec_T: its write only
        enc = self.enc_lstm
        # [r_t, h_enc] → encoder gates; the h_dec part of the gates is in the projection.
        enc_in = StepLinear(torch.cat([enc.weight_ih[:, : self.read_size], enc.weight_hh], dim=1))
        posterior = StepLinear(self.posterior.weight, self.posterior.bias)
        dec_in = StepLinear(self.dec_lstm.weight_ih[:, :self.config.z_dim])  # z_t → decoder gates
        context = self._context_step(keys, self.context_gates(h_lang), mask)
        st = self._initial_state(b)
        proj = proj_fn(self.h_dec0[None])  # (1, ·): h_dec_0 is the same for every image
        cfg = self.config
        read_att = self._attention(proj, write=False)[1]
        kl_steps, log_ratios = [], []
        # the cells, the posterior's sample and its KL in C++, with their gradients; the log-ratios
        # need μ_q and σ_q, and ε gets no gradient there
        kernels = step_kernels.differentiable(eps, st["c_enc"])
        latent_kernel = kernels and not (log_weight or eps.requires_grad)
        for t in range(cfg.steps):
            r = self._read(images, torch.sigmoid(st["canvas"]), read_att)
            parts = [proj["enc"], enc_in(torch.cat([r, st["h_enc"]], dim=1))]  # the encoder's gates
            st["h_enc"], st["c_enc"] = (step_kernels.lstm(parts, st["c_enc"]) if kernels
                                        else lstm_update(parts[0] + parts[1], st["c_enc"]))
            if latent_kernel:
                z, kl = step_kernels.posterior_kl(posterior(st["h_enc"]), proj["prior"] if t else None,
                                                  eps[:, t])
                kl_steps.append(kl)
            else:
                mu_q, log_sigma_q = posterior(st["h_enc"]).chunk(2, dim=-1)
                z = mu_q + log_sigma_q.exp() * eps[:, t]
                prior = self._prior(proj, t)
                kl_steps.append(gaussian_kl(mu_q, log_sigma_q, *prior))
                if log_weight:  # log p(z_t | ·) − log q(z_t | ·); the 2π terms cancel
                    log_ratios.append(gaussian_log_prob(z, *prior) - gaussian_log_prob(z, mu_q, log_sigma_q))
            st = self._decode(st, proj, z, context, dec_in, kernels)[0]
            proj = (proj_fn if t + 1 < cfg.steps else last_fn)(st["h_dec"])
            write_att, read_att = self._attention(proj, read=t + 1 < cfg.steps)
            assert write_att is not None
            st["canvas"] = self._write_onto(st["canvas"], proj, write_att)
        nll = bernoulli_nll(st["canvas"], images)
        kl_steps_t = torch.stack(kl_steps, dim=1)  # (B, T)
        kl = kl_steps_t.sum(1)
        weight = -nll + torch.stack(log_ratios, 1).sum(1) if log_weight else None
        return DrawLoss.of(nll, kl, kl_steps_t, weight)

    def _decode(self, st: dict[str, Tensor], proj: dict[str, Tensor], z: Tensor, context: ContextStep,
                dec_in: StepLinear, kernels: bool = False) -> tuple[dict[str, Tensor], Tensor]:
        """Alignment and generative LSTM update; returns the new state and α_t (B, L).

        ``context``: from ``_context_step``. ``kernels``: the cell in ``step_kernels.lstm``
        (where ``step_kernels.usable``, or ``differentiable`` with gradients)."""
        alpha, w_s = context(proj.get("query2"))
        parts = [proj["dec"], dec_in(z), w_s]  # W_hh h_dec + b, W_z z_t, W_s s_t
        st = dict(st)
        if kernels:
            st["h_dec"], st["c_dec"] = step_kernels.lstm(parts, st["c_dec"])
        else:
            st["h_dec"], st["c_dec"] = lstm_update(parts[0] + parts[1] + parts[2], st["c_dec"])
        return st, alpha

    # ----------------------------------------------------------------------------- generation
    @torch.no_grad()
    def sample(self, tokens: Tensor, lengths: Tensor, generator: torch.Generator | None = None,
               noise: Tensor | None = None, temperature: float = 1.0,
               history: bool = True) -> DrawSample:
        """Draw images from the learned prior, without the inference network.

        Args:
            tokens: (B, L) word ids. lengths: (B,). generator: source of z. noise: (B, T, Z).
            temperature: τ scales the prior's standard deviation, z_t = μ_t + τ·σ_t·ε_t
                (1: the paper's sampling; 0: the prior mean at every step).
            history: keep σ(c_t) of every step in ``canvases``; False keeps the final images
                only (``canvases`` is None): a (B, T+1, C, H, W) buffer less to fill.

        Returns:
            ``DrawSample`` with images, canvases, alignments and write windows.
        """
        temperature = check_temperature(temperature)  # before any compute
        cfg = self.config
        b = tokens.shape[0]
        h_lang, keys, mask = self.encode_captions(tokens, lengths)
        eps = self._noise(noise, b, h_lang, generator) * temperature
        proj_fn = self._projection(with_encoder=False, with_write=False)
        dec_in = StepLinear(self.dec_lstm.weight_ih[:, :cfg.z_dim])
        context = self._context_step(keys, self.context_gates(h_lang), mask)
        st = self._initial_state(b)
        proj = proj_fn(self.h_dec0[None])  # (1, ·): h_dec_0 is the same for every image
        h_decs, alphas = [], []
        kernels = step_kernels.usable(eps, st["c_dec"])  # the step's elementwise work in C++
        for t in range(cfg.steps):
            if kernels and t > 0:
                z = step_kernels.prior_sample(proj["prior"], eps[:, t])
            else:
                mu_p, log_sigma_p = self._prior(proj, t)
                z = mu_p + log_sigma_p.exp() * eps[:, t]
            st, alpha = self._decode(st, proj, z, context, dec_in, kernels)
            h_decs.append(st["h_dec"])
            alphas.append(alpha)
            if t + 1 < cfg.steps:
                proj = proj_fn(st["h_dec"])
        # the loop never changes st["canvas"]: it is still c_0
        canvas, canvases, boxes = self._write_all(st["canvas"], torch.stack(h_decs, dim=1), history)
        images = canvases[:, -1] if canvases is not None else torch.sigmoid(canvas)
        return DrawSample(images=images, canvases=canvases,
                          alignments=torch.stack(alphas, dim=1),  # (B, T, L)
                          write_windows=boxes)  # (B, T, 4)

    def _write_all(self, canvas: Tensor, h_dec: Tensor,
                   history: bool) -> tuple[Tensor, Tensor | None, Tensor]:
        """Every step's write, after the loop: sampling never reads the canvas in between.

        The write heads of all T states are one product, their filterbanks one call, and
        without history the T writes are one product per image (``attention.write_sum``).

        Args:
            canvas: (B, C, H, W) c_0. h_dec: (B, T, Dd) h_dec_1..h_dec_T.
            history: also return σ(c_0), …, σ(c_T).

        Returns:
            c_T (B, C, H, W); σ(c_0..c_T) (B, T+1, C, H, W) or None; the write windows'
            boxes (B, T, 4).
        """
        cfg = self.config
        b, t = h_dec.shape[:2]
        c, h, w, m = cfg.channels, cfg.height, cfg.width, cfg.write_n
        proj = self._projection(with_encoder=False, with_step=False)(h_dec)  # (B, T, ·) each
        params, patches = proj["write"], proj["patch"]
        params = params.reshape(b * t, 5)  # (B·T, 5)
        gamma, f_x, f_y = attention.attend([params], h, w, m, cfg.filter_eps)[0]  # (B·T,), (B·T, M, W|H)
        boxes = attention.window_box(attention.window_params(params, h, w, m), m).view(b, t, 4)  # (B, T, 4)
        patches = patches.reshape(b, t, c, m, m)  # (B, T, C, M, M)
        if not history:
            final = attention.write_sum(canvas, patches, f_x.view(b, t, m, w), f_y.view(b, t, m, h),
                                        gamma.view(b, t))
            return final, None, boxes
        writes = attention.write(patches.reshape(b * t, c, m, m), f_x, f_y, gamma)  # (B·T, C, H, W)
        # c_0, c_0 + w_1, (c_0 + w_1) + w_2, …: the loop's order of additions. (B, T+1, C, H, W)
        canvases = torch.cat([canvas[:, None], writes.view(b, t, c, h, w)], dim=1).cumsum(dim=1)
        return canvases[:, -1], torch.sigmoid(canvases), boxes
