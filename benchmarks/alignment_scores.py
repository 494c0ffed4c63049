"""Alignment scores vᵀtanh(x) two ways, eager and under torch.compile.

    python benchmarks/alignment_scores.py [--batch 100] [--words 12] [--align 512] [--threads 1]

Times ``torch.tanh(keys + query) @ v`` and the equal 2·vᵀσ(keys2 + query2) − Σv with
keys2 = 2·keys and query2 = 2·query (``aligndraw.alignment.doubled_scores``, what the model
runs: it doubles the keys once per caption and gets the query doubled from its fused
projection) on one step's (B, L, A) tensors, each eagerly and compiled, and prints the medians
(ms) and the largest difference from the tanh form; one JSON line last.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.utils.benchmark import Timer

from aligndraw.alignment import doubled_scores


def tanh_form(keys: torch.Tensor, query: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.tanh(keys + query[:, None, :]) @ v  # (B, L)


def sigmoid_form(keys2: torch.Tensor, query2: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return doubled_scores(keys2 + query2[:, None, :], v)  # (B, L)


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
    for name, fn, k, q in (("tanh", tanh_form, keys, query), ("sigmoid", sigmoid_form, 2 * keys, 2 * query)):
        for mode, f in (("eager", fn), ("compiled", torch.compile(fn))):
            out = f(k, q, v)  # compiles on the first call
            ms = Timer("f(k, q, v)", globals={"f": f, "k": k, "q": q, "v": v}) \
                .blocked_autorange(min_run_time=args.min_time).median * 1e3
            diff = float((out - reference).abs().max())
            result[f"{name}_{mode}_ms"] = ms
            print(f"{name:>8} {mode:>9}: {ms:7.3f} ms   max |difference| {diff:.1e}")
            result[f"{name}_{mode}_max_diff"] = diff
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
