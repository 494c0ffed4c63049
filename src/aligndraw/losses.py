"""Terms of the variational lower bound (PAPER.md, "Objective"), as pure functions.

    −L = Σ_pixels BCE(x, σ(c_T)) + Σ_t KL(Q(z_t | ·) ‖ P(z_t | z_<t, y))

All values are in nats. Gaussians are parameterised by mean and log standard deviation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def gaussian_kl(mu_q: Tensor, log_sigma_q: Tensor, mu_p: Tensor, log_sigma_p: Tensor) -> Tensor:
    """KL(N(μ_q, σ_q²) ‖ N(μ_p, σ_p²)) summed over the last dimension.

    ½ Σ [2 log σ_p − 2 log σ_q + (σ_q² + (μ_q − μ_p)²) / σ_p² − 1]

    Args:
        mu_q, log_sigma_q: (..., Z) posterior. mu_p, log_sigma_p: broadcastable prior.

    Returns:
        (...) KL in nats.
    """
    var_ratio = torch.exp(2 * (log_sigma_q - log_sigma_p))
    mean_term = (mu_q - mu_p).pow(2) * torch.exp(-2 * log_sigma_p)
    return 0.5 * (2 * (log_sigma_p - log_sigma_q) + var_ratio + mean_term - 1).sum(-1)


def bernoulli_nll(logits: Tensor, target: Tensor) -> Tensor:
    """−log p(x | c) for a Bernoulli with logits c, summed over all but the batch dimension.

    Used on continuous intensities in [0, 1] too, as in the paper.

    Args:
        logits: (B, C, H, W) final canvas c_T. target: (B, C, H, W) image x in [0, 1].

    Returns:
        (B,) negative log-likelihood in nats.
    """
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")  # (B, C, H, W)
    return bce.flatten(1).sum(-1)


def gaussian_log_prob(z: Tensor, mu: Tensor, log_sigma: Tensor) -> Tensor:
    """log N(z; μ, σ²) summed over the last dimension. Shapes (..., Z) → (...)."""
    return (-0.5 * ((z - mu) * torch.exp(-log_sigma)).pow(2) - log_sigma
            - 0.5 * math.log(2 * math.pi)).sum(-1)
