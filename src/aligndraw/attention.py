"""DRAW filterbank attention: Gaussian read and write windows (Gregor et al. 2015, §3.2).

Pure functions, no parameters: the model owns the linear layers that produce the five
attention numbers (g̃_x, g̃_y, log σ², log δ̃, log γ) from the generative state.

Symbols
    B batch, C channels, H/W image height/width (B and A in the paper), N grid size,
    g_x/g_y grid centre, delta stride, sigma2 filter variance, gamma intensity.

Pixel coordinates run a = 1..A so that g̃ = 0 puts the grid centre, (A+1)/2, exactly in the
middle of the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Window:
    """Attention window for a batch. All fields have shape (B,)."""

    g_x: Tensor
    g_y: Tensor
    delta: Tensor
    sigma2: Tensor
    gamma: Tensor


def window_params(params: Tensor, height: int, width: int, n: int) -> Window:
    """Map the five raw numbers to a window (DRAW eqs. 21–24).

    Args:
        params: (B, 5) = g̃_x, g̃_y, log σ², log δ̃, log γ.
        height, width: image size (B and A in the paper).
        n: grid size N.
    """
    g_tilde_x, g_tilde_y, log_sigma2, log_delta, log_gamma = params.unbind(-1)
    return Window(
        g_x=(width + 1) / 2 * (g_tilde_x + 1),
        g_y=(height + 1) / 2 * (g_tilde_y + 1),
        delta=(max(height, width) - 1) / (n - 1) * log_delta.exp(),
        sigma2=log_sigma2.exp(),
        gamma=log_gamma.exp(),
    )


def grid_centres(g: Tensor, delta: Tensor, n: int) -> Tensor:
    """Filter centres μ^i = g + (i − N/2 − 0.5) δ for i = 1..N (DRAW eqs. 19–20). Returns (B, N)."""
    offsets = torch.arange(1, n + 1, device=g.device, dtype=g.dtype) - n / 2 - 0.5  # (N,)
    return g[:, None] + offsets[None, :] * delta[:, None]  # (B, N)


def filterbank(g: Tensor, delta: Tensor, sigma2: Tensor, size: int, n: int,
               eps: float = 1e-4) -> Tensor:
    """Row-normalised Gaussian filterbank F[b, i, a] ∝ exp(−(a − μ^i)² / 2σ²) (DRAW eqs. 25–26).

    Args:
        g, delta, sigma2: (B,) grid centre, stride and variance along one axis.
        size: image extent along that axis (A or B).
        n: grid size N.
        eps: added to each row's sum so an all-zero row does not divide by zero.

    Returns:
        (B, N, size) filterbank.
    """
    mu = grid_centres(g, delta, n)  # (B, N)
    a = torch.arange(1, size + 1, device=g.device, dtype=g.dtype)  # (size,)
    f = torch.exp(-((a[None, None, :] - mu[:, :, None]) ** 2) / (2 * sigma2[:, None, None]))
    return f / (f.sum(-1, keepdim=True) + eps)  # (B, N, size)


def filterbanks(window: Window, height: int, width: int, n: int,
                eps: float = 1e-4) -> tuple[Tensor, Tensor]:
    """Both filterbanks of a window. Returns F_x (B, N, W) and F_y (B, N, H)."""
    f_x = filterbank(window.g_x, window.delta, window.sigma2, width, n, eps)
    f_y = filterbank(window.g_y, window.delta, window.sigma2, height, n, eps)
    return f_x, f_y


def read(images: Tensor, f_x: Tensor, f_y: Tensor, gamma: Tensor) -> Tensor:
    """Glimpse γ · F_y x F_xᵀ per channel (DRAW eq. 27).

    Args:
        images: (B, C, H, W); pass image and error image stacked on C to read both at once.
        f_x: (B, N, W). f_y: (B, N, H). gamma: (B,).

    Returns:
        (B, C, N, N) glimpses.
    """
    glimpse = f_y[:, None] @ images @ f_x[:, None].transpose(-1, -2)  # (B, C, N, N)
    return glimpse * gamma[:, None, None, None]


def write(patch: Tensor, f_x: Tensor, f_y: Tensor, gamma: Tensor) -> Tensor:
    """Place a patch on the canvas: (1/γ̂) · F̂_yᵀ w F̂_x per channel (DRAW eq. 29).

    Args:
        patch: (B, C, M, M). f_x: (B, M, W). f_y: (B, M, H). gamma: (B,).

    Returns:
        (B, C, H, W) canvas update.
    """
    update = f_y[:, None].transpose(-1, -2) @ patch @ f_x[:, None]  # (B, C, H, W)
    return update / gamma[:, None, None, None]


def window_box(window: Window, n: int) -> Tensor:
    """The grid's extent as (x0, y0, x1, y1) in 0-based pixel coordinates, shape (B, 4).

    The box spans the N filter centres plus half a stride on each side, i.e. g ± N·δ/2.
    """
    half = n * window.delta / 2
    # Coordinates a = 1..A are shifted by one to 0-based pixel positions.
    return torch.stack([window.g_x - half - 1, window.g_y - half - 1,
                        window.g_x + half - 1, window.g_y + half - 1], dim=-1)
