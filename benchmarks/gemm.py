"""fp32 matrix products through PyTorch's default BLAS and through oneDNN (``aligndraw.gemm``).

    python benchmarks/gemm.py [--preset mnist-captions] [--batch 100] [--threads 2]

Times, eagerly, the products of a training step of the preset's model — the fused h_dec
projection and the inference LSTM's input, forward (x·Wᵀ + b), input gradient (g·W) and the
weight gradient over all T steps (gᵀ·x with T·B rows) — and a square product, each with
``gemm.using("aten")`` (PyTorch's ``@``: MKL in the CPU build) and ``gemm.using("onednn")``
(the weight row-major, as a parameter is stored); for the forward and the input gradient also
oneDNN given the weight column-major (``onednn_column_major``: the layout of the step-shared
weights' forward products, ``gemm.forward_layout``, docs/performance.md item 30) and oneDNN given the weight
prepacked once into its blocked layout (``onednn_prepacked``: the packing not timed, as if done
once per forward pass; tried in the model, not kept, docs/performance-log.md); for the weight gradient
also oneDNN fed gᵀ directly (``onednn_direct``), the layout the library does not use, and for
the forward oneDNN given the weight as a column slice of a wider tensor
(``onednn_sliced_weight``), the layout ``gemm`` packs before calling it. Prints ms,
GFLOP/s and the largest relative difference from a float64 product; one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aligndraw import gemm  # noqa: E402
from aligndraw.config import ModelConfig, preset  # noqa: E402
from aligndraw.model import AlignDraw  # noqa: E402
from benchmarks.forms import compare_forms, relative_difference  # noqa: E402


def _with(backend: str, fn):
    def run(*args):
        with gemm.using(backend):
            return fn(*args)
    return run


def _onednn_raw(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")  # as given, not packed


def _onednn_prepacked(w: torch.Tensor):
    """x·wᵀ (+ b) with w (N, K) reordered once, untimed, into oneDNN's blocked layout."""
    packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), None)

    def run(x: torch.Tensor, _w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
    return run


def _onednn_direct(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(g.t(), x.t(), None, "none", [], "")  # (N, R)·(K, R)ᵀ


def product_shapes(cfg: ModelConfig, batch: int, square: int) -> dict[str, tuple[int, int, int]]:
    """(M, K, N) of x (M, K) · Wᵀ (K, N) for the model's two largest per-step products."""
    model = AlignDraw(cfg)
    proj = model._projection(with_encoder=True).linear.weight  # (P, Dd)
    enc_in = model.enc_lstm.weight_ih.shape[1] - cfg.dec_hidden + cfg.enc_hidden
    return {"projection": (batch, proj.shape[1], proj.shape[0]),
            "encoder_input": (batch, enc_in, 4 * cfg.enc_hidden),
            "square": (square, square, square)}


def time_products(m: int, k: int, n: int, steps: int, min_time: float, sliced: bool) -> dict:
    """Every form of the three products for x (M, K) and W (N, K); ``sliced``: also the
    unpacked column-slice weight (about a second per call at the model's sizes)."""
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g) for s in ((m, k), (n, k), (n,)))
    grad = torch.randn(m, n, generator=g)
    rows_g, rows_x = torch.randn(steps * m, n, generator=g), torch.randn(steps * m, k, generator=g)
    d = torch.float64
    cases = {
        "forward": (gemm.addmm_t, (x, w, b), x.to(d) @ w.to(d).T + b.to(d), 2 * m * k * n),
        "input_grad": (gemm.mm, (grad, w), grad.to(d) @ w.to(d), 2 * m * k * n),
        "weight_grad": (gemm.weight_grad, (rows_g, rows_x), rows_g.to(d).T @ rows_x.to(d),
                        2 * steps * m * k * n),
    }
    # the same weight as a column slice of a wider tensor, handed to oneDNN unpacked
    w_slice = torch.cat([w, torch.zeros_like(w)], dim=1)[:, :k]  # (N, K), rows 2K apart
    w_col = w.t().contiguous().t()  # (N, K) column-major
    out = {}
    for case, (fn, args, ref, flops) in cases.items():
        forms = [(backend, _with(backend, fn), args) for backend in gemm.BACKENDS]
        if case in ("forward", "input_grad"):  # the same product, the weight column-major
            forms.append(("onednn_column_major", _with("onednn", fn), (args[0], w_col, *args[2:])))
            # forward x·Wᵀ: W packed; input gradient g·W = g·(Wᵀ)ᵀ: Wᵀ packed
            forms.append(("onednn_prepacked", _onednn_prepacked(w if case == "forward" else w.t()), args))
        if case == "forward" and sliced:
            forms.append(("onednn_sliced_weight", _onednn_raw, (x, w_slice, b)))
        if case == "weight_grad":
            forms.append(("onednn_direct", _onednn_direct, args))
        print(f"{case} ({flops / 1e9:.3f} GFLOP)")
        timed = compare_forms(forms, ref.float(),
                              relative_difference,
                              min_time, modes=("eager",))
        for name, *_ in forms:
            ms = timed[f"{name}_eager_ms"]
            out[f"{case}_{name}_ms"] = ms
            out[f"{case}_{name}_gflops"] = flops / ms / 1e6
            out[f"{case}_{name}_diff"] = timed[f"{name}_eager_diff"]
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="mnist-captions", choices=("mnist-captions", "coco32"))
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--square", type=int, default=2048, help="side of the square product")
    p.add_argument("--steps", type=int, default=None, help="T for the weight gradient (the preset's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-time", type=float, default=1.0, help="seconds per measurement")
    args = p.parse_args(argv)
    if not torch.backends.mkldnn.is_available():
        p.error("this PyTorch build has no oneDNN: nothing to compare")
    torch.set_num_threads(args.threads)
    cfg = preset(args.preset).model
    steps = args.steps or cfg.steps
    result: dict = {"preset": args.preset, "batch": args.batch, "threads": args.threads, "steps": steps}
    for name, (m, k, n) in product_shapes(cfg, args.batch, args.square).items():
        print(f"== {name}: ({m} × {k}) · ({k} × {n})")
        square = name == "square"  # no sliced-weight form: minutes at the reference kernel's speed
        timed = time_products(m, k, n, 1 if square else steps, args.min_time, sliced=not square)
        result |= {f"{name}_{key}": v for key, v in timed.items()}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
