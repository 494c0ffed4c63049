"""The filterbank's Gaussian exp(−(a − μ)²/2σ²) two ways, eager and under torch.compile.

    python benchmarks/filterbank_exp.py [--batch 100] [--n 8] [--size 60] [--threads 1]

Times ``torch.exp(d² · (−1/2σ²))`` and the equal ``torch.exp2(d² · (−log₂e/2σ²))`` (what
``aligndraw.attention.filterbank`` computes eagerly; the factor sits on the (B,) vector; under
torch.compile it keeps exp, which was faster inside the fused sampling graph) on one step's
four filterbanks, d = a − μ of shape (4B, N, size), each eagerly and compiled, and prints the
medians (ms) and the largest relative difference from the exp form; one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aligndraw.attention import LOG2_E  # noqa: E402
from benchmarks.forms import compare_forms  # noqa: E402


def exp_form(d: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    return torch.exp(d * d * (-0.5 / sigma2)[:, None, None])  # (4B, N, size)


def exp2_form(d: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    return torch.exp2(d * d * (-0.5 * LOG2_E / sigma2)[:, None, None])  # (4B, N, size)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--n", type=int, default=8, help="grid size N")
    p.add_argument("--size", type=int, default=60, help="image side")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--min-time", type=float, default=1.0, help="seconds per measurement")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    banks = 4 * args.batch  # read and write, x and y
    a = torch.arange(1, args.size + 1, dtype=torch.float32)
    mu = torch.rand(banks, args.n, 1, generator=g) * args.size
    d = a - mu  # (4B, N, size)
    sigma2 = torch.rand(banks, generator=g) * 4 + 0.25
    reference = exp_form(d, sigma2)
    result: dict = {"shape": list(d.shape), "threads": args.threads}
    result |= compare_forms([("exp", exp_form, (d, sigma2)), ("exp2", exp2_form, (d, sigma2))], reference,
                            lambda out, ref: float(((out - ref).abs() / ref.clamp_min(1e-30)).max()),
                            args.min_time)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
