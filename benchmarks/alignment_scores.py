"""Alignment scores vᵀtanh(x) three ways, eager and under torch.compile.

    python benchmarks/alignment_scores.py [--batch 100] [--words 12] [--align 512] [--threads 1]

Times, on one step's (B, L, A) tensors, eagerly and compiled:
- tanh: ``torch.tanh(keys + query) @ v``;
- sigmoid: the equal 2·vᵀσ(keys2 + query2) − Σv with keys2 = 2·keys and query2 = 2·query
  (tanh(x) = 2σ(2x) − 1; the model's form before the factored one);
- factored: σ(keys2 + query2) as 1 / (1 + e^(−keys2)·e^(−query2)) with e^(−keys2) given
  (``aligndraw.alignment.factored_scores``, what the model runs: the (B, L, A) exponentials
  once per caption, ``key_factors``).
Prints the medians (ms) and the largest absolute difference from the tanh form; one JSON line
last.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aligndraw.alignment import factored_scores, key_factors  # noqa: E402
from benchmarks.forms import compare_forms  # noqa: E402


def tanh_form(keys: torch.Tensor, query: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.tanh(keys + query[:, None, :]) @ v  # (B, L)


def sigmoid_form(keys2: torch.Tensor, query2: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(keys2 + query2[:, None, :]) @ v) * 2 - v.sum()  # (B, L)


def factored_form(keys2: torch.Tensor, factors: torch.Tensor, query2: torch.Tensor,
                  v: torch.Tensor) -> torch.Tensor:
    return factored_scores(keys2, factors, query2, v)  # (B, L)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--words", type=int, default=12)
    p.add_argument("--align", type=int, default=512, help="alignment size A")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--min-time", type=float, default=1.0, help="seconds per measurement")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(args.batch, args.words, args.align, generator=g)
    query = torch.randn(args.batch, args.align, generator=g)
    v = torch.randn(args.align, generator=g) / args.align ** 0.5
    reference = tanh_form(keys, query, v)
    result: dict = {"shape": [args.batch, args.words, args.align], "threads": args.threads}
    result |= compare_forms([("tanh", tanh_form, (keys, query, v)),
                             ("sigmoid", sigmoid_form, (2 * keys, 2 * query, v)),
                             ("factored", factored_form, (2 * keys, key_factors(2 * keys), 2 * query, v))],
                            reference, lambda out, ref: float((out - ref).abs().max()), args.min_time)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
