"""The paper's baselines, and ``build_model``, which makes any model a config names.

Recurrent baselines are :class:`aligndraw.model.AlignDraw` with another sentence context:
    noalign  s_t = mean over words of h_lang (no alignment)            (noalignDRAW)
    sentvec  s_t = v, a frozen sentence vector (aligndraw.sentence_vectors) (skipthoughtDRAW)

One-shot conditional VAEs (``CaptionVAE``), conditioned on y = mean over words of h_lang
from the same bidirectional LSTM, trained jointly:
    q(z | x, y) = N(μ, σ) from enc(x) and y;  p(z | y) = N(μ_p, σ_p), learned like alignDRAW's
    prior (tanh-bounded μ, log σ);  p(x | z, y) = Bernoulli(σ(dec([z, y])))
    fcvae    enc, dec: two fully connected hidden layers (ReLU) of ``vae_hidden`` units
    convvae  enc: three 4×4 stride-2 convolutions (ReLU); dec: a linear map and three
             transposed convolutions back to H×W

They share the recurrent model's interface (``forward`` → ``DrawLoss``, ``sample`` →
``DrawSample``, ``encoder``, ``noise_shape``) with T = 1, so the trainer, checkpoints, pipeline
and every metric run on them unchanged; their "drawing" is one step (blank canvas, then the
image), the word weights are uniform and the write box is the whole image.

Symbols: B batch, L words, C/H/W image, Z latent, D2 caption-state size, F hidden units.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from aligndraw.alignment import mean_context
from aligndraw.config import ModelConfig
from aligndraw.language import CaptionEncoder, padding_mask
from aligndraw.losses import bernoulli_nll, gaussian_kl, gaussian_log_prob
from aligndraw.model import AlignDraw, DrawLoss, DrawSample, check_temperature, standard_noise

CONV_LAYERS = 3  # convvae: each halves H and W (rounding down)


def build_model(config: ModelConfig) -> Model:
    """The model ``config.model`` names, freshly initialised."""
    if config.model in ("fcvae", "convvae"):
        return CaptionVAE(config)
    return AlignDraw(config)


def conv_sizes(size: int, layers: int = CONV_LAYERS) -> list[int]:
    """Spatial sizes through 4×4, stride-2, padding-1 convolutions: [size, ⌊size/2⌋, …]."""
    sizes = [size]
    for _ in range(layers):
        sizes.append((sizes[-1] + 2 - 4) // 2 + 1)
    if sizes[-1] < 1:
        raise ValueError(f"an image side of {size} is too small for {layers} stride-2 convolutions")
    return sizes


class _ConvEncoder(nn.Module):
    """(B, C, H, W) → (B, K·h·w) through ``CONV_LAYERS`` stride-2 convolutions."""

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = channels
        for i in range(CONV_LAYERS):
            layers += [nn.Conv2d(c_in, width * 2**i, 4, stride=2, padding=1), nn.ReLU()]
            c_in = width * 2**i
        self.net = nn.Sequential(*layers, nn.Flatten())

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class _DeconvDecoder(nn.Module):
    """(B, K·h·w) → (B, C, H, W) logits, mirroring ``_ConvEncoder``'s sizes exactly."""

    def __init__(self, channels: int, width: int, heights: list[int], widths: list[int]) -> None:
        super().__init__()
        self.start = (width * 2 ** (CONV_LAYERS - 1), heights[-1], widths[-1])
        layers: list[nn.Module] = []
        for i in reversed(range(CONV_LAYERS)):
            c_in = width * 2**i
            c_out = channels if i == 0 else width * 2 ** (i - 1)
            # (n − 1)·2 − 2 + 4 = 2n; output_padding makes up the odd sizes the encoder floored.
            pad = (heights[i] - 2 * heights[i + 1], widths[i] - 2 * widths[i + 1])
            layers.append(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, output_padding=pad))
            if i:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h.view(-1, *self.start))  # (B, K, h, w) → (B, C, H, W)


class CaptionVAE(nn.Module):
    """Conditional VAE baseline (``fcvae`` or ``convvae``) with a learned conditional prior."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.model not in ("fcvae", "convvae"):
            raise ValueError(f"CaptionVAE builds 'fcvae' or 'convvae', not {config.model!r}")
        self.config = cfg = config
        self.encoder = CaptionEncoder(cfg.vocab_size, cfg.embed_dim, cfg.lang_hidden)
        y_dim, z, f = self.encoder.out_dim, cfg.z_dim, cfg.vae_hidden
        pixels = cfg.channels * cfg.height * cfg.width
        if cfg.model == "fcvae":
            self.image_net: nn.Module = nn.Sequential(nn.Flatten(), nn.Linear(pixels, f), nn.ReLU())
            feat = f
            self.posterior = nn.Sequential(nn.Linear(feat + y_dim, f), nn.ReLU(), nn.Linear(f, 2 * z))
            self.decoder: nn.Module = nn.Sequential(
                nn.Linear(z + y_dim, f), nn.ReLU(), nn.Linear(f, f), nn.ReLU(), nn.Linear(f, pixels))
        else:
            hs, ws = conv_sizes(cfg.height), conv_sizes(cfg.width)
            self.image_net = _ConvEncoder(cfg.channels, cfg.conv_channels)
            feat = cfg.conv_channels * 2 ** (CONV_LAYERS - 1) * hs[-1] * ws[-1]
            self.posterior = nn.Linear(feat + y_dim, 2 * z)
            self.decoder = nn.Sequential(nn.Linear(z + y_dim, feat), nn.ReLU(),
                                         _DeconvDecoder(cfg.channels, cfg.conv_channels, hs, ws))
        self.prior = nn.Linear(y_dim, 2 * z)  # tanh → μ, log σ of p(z | y)

    def noise_shape(self, batch: int) -> tuple[int, int, int]:
        """Shape (B, 1, Z) of the standard-normal noise: one latent, one "step"."""
        return (batch, 1, self.config.z_dim)

    def _noise(self, noise: Tensor | None, batch: int, like: Tensor,
               generator: torch.Generator | None) -> Tensor:
        return standard_noise(self.noise_shape(batch), noise, like, generator)[:, 0]  # (B, Z)

    def sentence(self, tokens: Tensor, lengths: Tensor,
                 h_lang: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """y (B, D2), the mean over words of h_lang, and the uniform word weights (B, L)."""
        if h_lang is None:
            h_lang = self.encoder(tokens, lengths)
        alpha, y = mean_context(h_lang, padding_mask(lengths, h_lang.shape[1]))
        return y, alpha

    def _prior(self, y: Tensor) -> tuple[Tensor, Tensor]:
        mu, log_sigma = torch.tanh(self.prior(y)).chunk(2, dim=-1)  # (B, Z) each
        return mu, log_sigma

    def forward(self, images: Tensor, tokens: Tensor, lengths: Tensor,
                generator: torch.Generator | None = None, noise: Tensor | None = None,
                h_lang: Tensor | None = None, log_weight: bool = False) -> DrawLoss:
        """Negative lower bound with one posterior sample; arguments as ``AlignDraw.forward``
        (noise: (B, 1, Z)). kl_steps is (B, 1)."""
        y, _ = self.sentence(tokens, lengths, h_lang)
        eps = self._noise(noise, images.shape[0], images, generator)
        feat = self.image_net(images)  # (B, F')
        mu_q, log_sigma_q = self.posterior(torch.cat([feat, y], 1)).chunk(2, dim=-1)
        z = mu_q + log_sigma_q.exp() * eps
        prior = self._prior(y)
        kl = gaussian_kl(mu_q, log_sigma_q, *prior)  # (B,)
        logits = self.decoder(torch.cat([z, y], 1)).view_as(images)  # (B, C, H, W)
        nll = bernoulli_nll(logits, images)
        weight = None
        if log_weight:
            weight = -nll + gaussian_log_prob(z, *prior) - gaussian_log_prob(z, mu_q, log_sigma_q)
        return DrawLoss.of(nll, kl, kl[:, None], weight)  # kl_steps (B, 1): one latent

    @torch.no_grad()
    def sample(self, tokens: Tensor, lengths: Tensor, generator: torch.Generator | None = None,
               noise: Tensor | None = None, temperature: float = 1.0,
               history: bool = True) -> DrawSample:
        """Images from the conditional prior, z = μ + τ·σ·ε (``temperature`` and ``history``
        as in ``AlignDraw.sample``); ``DrawSample`` with T = 1 (see the module doc)."""
        temperature = check_temperature(temperature)  # before any compute
        cfg = self.config
        y, alpha = self.sentence(tokens, lengths)
        mu, log_sigma = self._prior(y)
        eps = self._noise(noise, tokens.shape[0], y, generator) * temperature
        z = mu + log_sigma.exp() * eps
        images = torch.sigmoid(self.decoder(torch.cat([z, y], 1)))
        images = images.view(-1, cfg.channels, cfg.height, cfg.width)  # (B, C, H, W)
        blank = torch.zeros_like(images)
        box = images.new_tensor([0.0, 0.0, cfg.width, cfg.height]).expand(len(images), 1, 4)
        canvases = torch.stack([blank, images], 1) if history else None  # (B, 2, C, H, W)
        return DrawSample(images=images, canvases=canvases,
                          alignments=alpha[:, None, :], write_windows=box)


Model = AlignDraw | CaptionVAE  # anything build_model makes
