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

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from aligndraw import gemm, step_kernels

LOG2_E = 1 / math.log(2)  # log₂ e


def flush_exponent(dtype: torch.dtype) -> float | None:
    """The exponent u below which a filterbank weight e^u is set to exactly 0, or None (keep all).

    A Gaussian filterbank's far weights are tiny: e^u for u down to −104 in fp32, and those
    under 1.2e-38 (u < −87.3) are subnormal numbers. On x86 CPUs every operation that meets a
    subnormal operand or result takes a microcode assist (Intel: of the order of a hundred
    cycles; on the Intel Xeon of 2026-12-02 a read product F_y·x at mnist-captions' shapes took
    119.9 µs with the plain filterbank and 25.8 µs with this one: ``benchmarks/subnormals.py``).
    Weights below √tiny (u < ½ ln tiny ≈ −43.7 for fp32 and bf16) are set to 0:
    then a weight times any value at least √tiny is normal again. The weights dropped are
    below 1.1e-19 before normalisation (by the row's sum plus ``eps``, 1e-4 by default, so below
    1.1e-15 after), which fp32 sums next to the row's larger weights do not see. float64 keeps every
    weight (its subnormals start at 2.2e-308), as do types with a narrower range.
    """
    if dtype in (torch.float32, torch.bfloat16):
        return 0.5 * math.log(torch.finfo(dtype).tiny)
    return None


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
    d = a[None, None, :] - mu[:, :, None]  # (B, N, size)
    # Scale on the (B,) vector, not on the (B, N, size) tensor: fewer large operations. Eagerly
    # exp(u) is computed as 2^(u·log₂e), the factor folded into that vector: CPU exp2 is several
    # times faster than exp (benchmarks/filterbank_exp.py). Compiled, exp2 made the fused
    # sampling graph slower, so the compiler gets exp.
    # Weights under e^flush_exponent become exactly 0 (exp(−inf)), so that no subnormal
    # number is formed here or in the products that use the filterbank.
    base, log_base = (torch.exp, 1.0) if torch.compiler.is_compiling() else (torch.exp2, LOG2_E)
    u = d * d * (-0.5 * log_base / sigma2)[:, None, None]  # (B, N, size), in units of log base
    flush = flush_exponent(u.dtype)
    if flush is not None:
        u = torch.where(u < flush * log_base, -math.inf, u)  # a NaN stays NaN
    f = base(u)
    return f / (f.sum(-1, keepdim=True) + eps)  # (B, N, size)


def filterbanks(window: Window, height: int, width: int, n: int,
                eps: float = 1e-4) -> tuple[Tensor, Tensor]:
    """Both filterbanks of a window. Returns F_x (B, N, W) and F_y (B, N, H)."""
    f_x = filterbank(window.g_x, window.delta, window.sigma2, width, n, eps)
    f_y = filterbank(window.g_y, window.delta, window.sigma2, height, n, eps)
    return f_x, f_y


def filterbanks_batched(windows: list[Window], sizes: list[int], height: int, width: int,
                        eps: float = 1e-4) -> list[tuple[Tensor, Tensor]]:
    """``filterbanks`` of several windows (grid sizes ``sizes``) with as few calls as possible.

    Windows with the same grid size share one ``filterbank`` call, and on a square image so do
    their x and y axes: one call per step for DRAW's read and write windows when N = M.

    Returns:
        (F_x (B, n, W), F_y (B, n, H)) for each window, in order.
    """
    out: list[tuple[Tensor, Tensor] | None] = [None] * len(windows)
    for n in sorted(set(sizes)):
        idx = [i for i, size in enumerate(sizes) if size == n]
        group = [windows[i] for i in idx]
        if height != width:
            for i in idx:
                out[i] = filterbanks(windows[i], height, width, n, eps)
            continue
        k = len(group)
        g = torch.cat([w.g_x for w in group] + [w.g_y for w in group])  # (2k·B,)
        delta = torch.cat([w.delta for w in group] * 2)
        sigma2 = torch.cat([w.sigma2 for w in group] * 2)
        banks = filterbank(g, delta, sigma2, width, n, eps).chunk(2 * k)  # 2k × (B, n, W)
        for j, i in enumerate(idx):
            out[i] = (banks[j], banks[k + j])
    return out  # type: ignore[return-value]


def attend(params: list[Tensor], height: int, width: int, n: int,
           eps: float = 1e-4) -> list[tuple[Tensor, Tensor, Tensor]]:
    """The intensity and filterbanks of several sets of windows with a grid of ``n``, from their
    raw numbers: ``window_params`` and ``filterbanks`` in as few calls as possible.

    Eagerly on the CPU in fp32 that is one C++ op for all of them, and one for their gradient
    (``step_kernels.attend``); elsewhere (compiled, autocast, other dtypes and devices)
    ``window_params`` and ``filterbanks_batched``.

    Args:
        params: each (B_k, 5) = g̃_x, g̃_y, log σ², log δ̃, log γ.

    Returns:
        (γ (B_k,), F_x (B_k, n, W), F_y (B_k, n, H)) for each, in order.
    """
    if step_kernels.differentiable(*params):  # CPU fp32, eagerly
        gamma, f_x, f_y = step_kernels.attend(params, height, width, n, eps,
                                              flush_exponent(torch.float32))
        sizes = [p.shape[0] for p in params]
        return list(zip(gamma.split(sizes), f_x.split(sizes), f_y.split(sizes), strict=True))
    windows = [window_params(p, height, width, n) for p in params]
    banks = filterbanks_batched(windows, [n] * len(windows), height, width, eps)
    return [(w.gamma, f_x, f_y) for w, (f_x, f_y) in zip(windows, banks, strict=True)]


def read(images: Tensor, f_x: Tensor, f_y: Tensor, gamma: Tensor) -> Tensor:
    """Glimpse γ · F_y x F_xᵀ per channel (DRAW eq. 27).

    Args:
        images: (B, C, H, W).
        f_x: (B, N, W). f_y: (B, N, H). gamma: (B,).

    Returns:
        (B, C, N, N) glimpses.
    """
    rows = gemm.matmul(f_y[:, None], images)  # (B, 1, N, H) @ (B, C, H, W) → (B, C, N, W)
    glimpse = gemm.matmul(rows, f_x[:, None].transpose(-1, -2))  # (B, C, N, N)
    return glimpse * gamma[:, None, None, None]


def write(patch: Tensor, f_x: Tensor, f_y: Tensor, gamma: Tensor) -> Tensor:
    """Place a patch on the canvas: (1/γ̂) · F̂_yᵀ w F̂_x per channel (DRAW eq. 29).

    Args:
        patch: (B, C, M, M). f_x: (B, M, W). f_y: (B, M, H). gamma: (B,).

    Returns:
        (B, C, H, W) canvas update.
    """
    # Scale the small M×M patch rather than the H×W result: same value, far fewer operations.
    patch = patch / gamma[:, None, None, None]
    return gemm.matmul(f_y[:, None].transpose(-1, -2), gemm.matmul(patch, f_x[:, None]))  # (B, C, H, W)


def write_onto(canvas: Tensor, patch: Tensor, f_x: Tensor, f_y: Tensor, gamma: Tensor) -> Tensor:
    """canvas + write(patch, f_x, f_y, gamma), the addition fused into the last product.

    Args:
        canvas: (B, C, H, W). patch: (B, C, M, M). f_x: (B, M, W). f_y: (B, M, H). gamma: (B,).

    Returns:
        (B, C, H, W) new canvas. One ``baddbmm`` instead of a product and a full-image add;
        under torch.compile the canvas also becomes a real buffer each step rather than a
        chain of additions the compiler may recompute. Under autocast it falls back to
        ``canvas + write(…)``, so the canvas keeps its own (fp32) precision.
    """
    if torch.is_autocast_enabled(canvas.device.type):
        return canvas + write(patch, f_x, f_y, gamma)
    b, c, h, w = canvas.shape
    m = patch.shape[-1]
    right = gemm.matmul(patch / gamma[:, None, None, None], f_x[:, None])  # (B, C, M, W)
    left = f_y.transpose(1, 2)[:, None].expand(b, c, h, m)  # (B, C, H, M)
    out = gemm.baddbmm(canvas.reshape(b * c, h, w), left.reshape(b * c, h, m),
                       right.reshape(b * c, m, w))  # (B·C, H, W)
    return out.view(b, c, h, w)


def write_sum(canvas: Tensor, patches: Tensor, f_x: Tensor, f_y: Tensor, gamma: Tensor) -> Tensor:
    """canvas + Σ_t write(patch_t, f_x_t, f_y_t, γ_t): T steps' writes as one product per image.

    The sum over steps and each write's sum over its M patch rows are one contraction of
    length T·M: c + [F̂_y1ᵀ … F̂_yTᵀ]·[(w_1/γ_1)F̂_x1; …; (w_T/γ_T)F̂_xT], per image and
    channel. For when nothing reads the canvas between steps (sampling without history): one
    (H × T·M)·(T·M × W) product instead of T products with M = 8 terms each.

    Args:
        canvas: (B, C, H, W). patches: (B, T, C, M, M). f_x: (B, T, M, W). f_y: (B, T, M, H).
        gamma: (B, T).

    Returns:
        (B, C, H, W). Under autocast the canvas is added in its own precision, as in
        ``write_onto``.
    """
    b, c, h, w = canvas.shape
    t, m = patches.shape[1], patches.shape[-1]
    scaled = patches.transpose(1, 2) / gamma[:, None, :, None, None]  # (B, C, T, M, M)
    right = gemm.matmul(scaled, f_x[:, None]).reshape(b * c, t * m, w)  # (B·C, T·M, W)
    left = f_y.reshape(b, t * m, h).transpose(1, 2)  # (B, H, T·M), a view
    if c > 1:
        left = left[:, None].expand(b, c, h, t * m).reshape(b * c, h, t * m)  # (B·C, H, T·M)
    flat = canvas.reshape(b * c, h, w)  # (B·C, H, W)
    if torch.is_autocast_enabled(canvas.device.type):
        return (flat + torch.bmm(left, right)).view(b, c, h, w)
    return gemm.baddbmm(flat, left, right).view(b, c, h, w)


def window_box(window: Window, n: int) -> Tensor:
    """The grid's extent as (x0, y0, x1, y1) in 0-based pixel coordinates, shape (B, 4).

    The box spans the N filter centres plus half a stride on each side, i.e. g ± N·δ/2.
    """
    half = n * window.delta / 2
    # Coordinates a = 1..A are shifted by one to 0-based pixel positions.
    return torch.stack([window.g_x - half - 1, window.g_y - half - 1,
                        window.g_x + half - 1, window.g_y + half - 1], dim=-1)
