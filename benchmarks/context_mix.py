"""The caption-context mix Σ_j α_j ctx_j of one step in fp32 and in bf16, eagerly.

    python benchmarks/context_mix.py [--batch 100] [--words 12] [--width 1200] [--threads 2]

Times ``(α[:, None, :] @ ctx).squeeze(1)`` — (B, 1, L)·(B, L, 4·Dd), one row per image — with
both operands in fp32 and in bf16 (what autocast would run), prints the medians (ms) and the
largest relative difference of the bf16 result. The model keeps this mix in fp32 under autocast
(``aligndraw.recurrent_linear.StepMix``). Then the mix's gradient for α in fp32, Σ_d ctx·g per
word, in two forms of the same product: ``grad_row`` (B, 1, D)·(B, D, L), what ``StepMix``
computes (``mix_weights_grad``), and ``grad_column`` (B, L, D)·(B, D, 1), the form it
replaced. One JSON line last.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aligndraw.recurrent_linear import mix_weights_grad  # noqa: E402
from benchmarks.forms import compare_forms, relative_difference  # noqa: E402


def mix(alpha: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    return (alpha[:, None, :] @ ctx).squeeze(1).float()  # (B, 1, L) @ (B, L, D) → (B, D)


def grad_column(ctx: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return (ctx @ grad[:, :, None]).squeeze(-1)  # (B, L, D) @ (B, D, 1) → (B, L)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--words", type=int, default=12)
    p.add_argument("--width", type=int, default=1200, help="4·D_dec (mnist-captions 1200, coco32 2200)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-time", type=float, default=1.0, help="seconds per measurement")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    alpha = torch.softmax(torch.randn(args.batch, args.words, generator=g), -1)
    ctx = torch.randn(args.batch, args.words, args.width, generator=g)
    reference = mix(alpha, ctx)
    result: dict = {"shape": list(ctx.shape), "threads": args.threads}
    result |= compare_forms([("fp32", mix, (alpha, ctx)),
                             ("bf16", mix, (alpha.bfloat16(), ctx.bfloat16()))], reference,
                            relative_difference,
                            args.min_time, modes=("eager",))
    grad = torch.randn(args.batch, args.width, generator=g)
    grad_reference = (ctx.double() @ grad.double()[:, :, None]).squeeze(-1)
    result |= compare_forms([("grad_row", mix_weights_grad, (ctx, grad)),
                             ("grad_column", grad_column, (ctx, grad))], grad_reference,
                            relative_difference,
                            args.min_time, modes=("eager",))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
