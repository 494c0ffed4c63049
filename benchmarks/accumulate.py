"""A shared weight's gradient over T steps, Σ_t g_tᵀ x_t, in the three forms a compiled
backward can take, eagerly.

    python benchmarks/accumulate.py [--preset mnist-captions] [--batch 100] [--threads 2]

For the preset's shared weights (``gemm.product_shapes``' h_dec projection, (3286, 300) in
mnist-captions, and inference LSTM input, (1200, 428); z's decoder gates, (1200, 150)),
over its T steps, times:

- ``addmm_chain``: acc = addmm(acc, g_tᵀ, x_t) step after step, each into a new tensor (what
  inductor makes of such a sum): every step first copies the running sum;
- ``in_place``: acc.addmm_(g_tᵀ, x_t) (what a trial version of ``aligndraw.compiler`` made of
  it while the CPU products are MKL's; not kept: no gain in the whole compiled model,
  docs/performance-log.md);
- ``stacked``: one product over T·B rows, the operands concatenated first (what the pass makes
  of it with oneDNN products).

Prints ms and the largest relative difference from a float64 sum; one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aligndraw.config import preset  # noqa: E402
from benchmarks.forms import compare_forms, relative_difference  # noqa: E402
from benchmarks.gemm import product_shapes  # noqa: E402


def weight_shapes(preset_name: str) -> tuple[int, dict[str, tuple[int, int]]]:
    """The preset's T and its shared weights' (N, K): a gradient gᵀx of (N, B)·(B, K) a step."""
    cfg = preset(preset_name).model
    shapes = {name: (n, k) for name, (_, k, n) in product_shapes(cfg, 1, 1).items() if name != "square"}
    return cfg.steps, shapes | {"decoder_z": (4 * cfg.dec_hidden, cfg.z_dim)}


def addmm_chain(gs: list[torch.Tensor], xs: list[torch.Tensor]) -> torch.Tensor:
    acc = gs[0].t() @ xs[0]
    for g, x in zip(gs[1:], xs[1:], strict=True):
        acc = torch.addmm(acc, g.t(), x)  # (N, K) + (N, B)·(B, K), a new tensor
    return acc


def in_place(gs: list[torch.Tensor], xs: list[torch.Tensor]) -> torch.Tensor:
    acc = gs[0].t() @ xs[0]
    for g, x in zip(gs[1:], xs[1:], strict=True):
        acc.addmm_(g.t(), x)  # the same product, into acc
    return acc


def stacked(gs: list[torch.Tensor], xs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(gs).t() @ torch.cat(xs)  # (N, T·B)·(T·B, K)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="mnist-captions", choices=("mnist-captions", "coco32"))
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--steps", type=int, help="summed steps (default: the preset's T)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--scale", type=int, default=1, help="divide the weights' sizes by this (for tests)")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds per measurement")
    args = p.parse_args(argv)
    steps, shapes = weight_shapes(args.preset)
    args.steps = args.steps or steps
    if min(args.batch, args.steps, args.threads, args.scale) < 1 or args.min_time <= 0:
        p.error("--batch, --steps, --threads and --scale must be ≥ 1 and --min-time > 0")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    result: dict = {"batch": args.batch, "steps": args.steps, "threads": args.threads}
    for name, (n, k) in shapes.items():
        n, k = max(1, n // args.scale), max(1, k // args.scale)
        gs = [torch.randn(args.batch, n, generator=gen) for _ in range(args.steps)]
        xs = [torch.randn(args.batch, k, generator=gen) for _ in range(args.steps)]
        reference = stacked([g.double() for g in gs], [x.double() for x in xs])
        print(f"{name}: ({n}, {k}) over {args.steps} steps of {args.batch} rows")
        forms = [(form.__name__, form, (gs, xs)) for form in (addmm_chain, in_place, stacked)]
        result |= {f"{name}_{key}": value for key, value in compare_forms(
            forms, reference, relative_difference, args.min_time, modes=("eager",)).items()}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
