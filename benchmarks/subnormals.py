"""Subnormal numbers: where a training step makes them, and what they cost a filterbank product.

    python benchmarks/subnormals.py [--preset mnist-captions] [--batch 100] [--threads 2]

1. Counts, per aten op, the subnormal fp32 values (nonzero, below ``finfo.tiny``) in the
   outputs (views left out) of one eager training step of the library and of the naive reference (same weights
   and inputs as ``throughput.py``), through a ``TorchDispatchMode``.
2. Times one read product F_y·x, (B, N, H) · (B, H, W), with the plain filterbank (far weights
   e^u left as they fall, subnormal ones included) and with the library's (weights under
   e^flush_exponent set to 0), on narrow windows spread over the image, and counts the
   subnormal weights of each.

Prints both and one JSON line last. On x86 the product with subnormal operands is the slow one.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.benchmark import Timer

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aligndraw import attention  # noqa: E402
from aligndraw.config import ModelConfig, preset  # noqa: E402
from aligndraw.model import AlignDraw  # noqa: E402
from benchmarks.naive_reference import NaiveAlignDraw, gaussian_filters, load_from_library  # noqa: E402
from benchmarks.throughput import PRESETS, SMOKE_CONFIG, Variant, random_inputs  # noqa: E402


def subnormal_count(t: torch.Tensor) -> int:
    """Nonzero fp32 values of ``t`` below the smallest normal number."""
    return int(((t != 0) & (t.abs() < torch.finfo(torch.float32).tiny)).sum())


class SubnormalOutputs(TorchDispatchMode):
    """Counts subnormal values in the fp32 outputs of every aten op run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.values: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func in (torch.ops.aten.empty_strided.default,
                                    torch.ops.aten.new_empty_strided.default):
            return out  # a view's values were counted where they were made; uninitialised memory
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel():
                if n := subnormal_count(t):
                    self.values[str(func)] += n
        return out


def step_counts(cfg: ModelConfig, batch: int, caption_len: int) -> dict[str, dict[str, int]]:
    """{"library"|"naive": {op: subnormal values}} over one eager fp32 training step each."""
    inputs = random_inputs(cfg, batch, caption_len, torch.device("cpu"), seed=0)
    torch.manual_seed(0)
    library = AlignDraw(cfg)
    models = {"library": library, "naive": load_from_library(NaiveAlignDraw(cfg), library)}
    counts = {}
    for name, model in models.items():
        variant = Variant(name, model, "fp32", inputs, seed=0)
        with SubnormalOutputs() as mode:
            variant.train_step()
        counts[name] = dict(mode.values.most_common())
    return counts


def read_product(batch: int, n: int, size: int, min_time: float) -> dict[str, float]:
    """F_y · x with the plain and the library's filterbank: µs per call and subnormal weights."""
    g = torch.Generator().manual_seed(0)
    centre = torch.rand(batch, generator=g) * (size + 20) - 10  # some windows partly off the image
    delta = torch.full((batch,), 2.0)
    sigma2 = torch.rand(batch, generator=g) * 0.5 + 0.05  # narrow: far weights fall very low
    x = torch.rand(batch, size, size, generator=g)
    out = {}
    for name, bank in (("plain", gaussian_filters(centre, delta, sigma2, size, n, 1e-4)),
                       ("library", attention.filterbank(centre, delta, sigma2, size, n))):
        out[f"{name}_subnormal_weights"] = subnormal_count(bank)
        out[f"{name}_us"] = Timer("torch.bmm(f, x)", globals={"torch": torch, "f": bank, "x": x},
                                  num_threads=torch.get_num_threads()
                                  ).blocked_autorange(min_run_time=min_time).median * 1e6
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=PRESETS, default="mnist-captions")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--caption-len", type=int, default=12)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--smoke", action="store_true", help="tiny config and batch (for CI)")
    args = p.parse_args(argv)
    if args.batch < 1 or args.caption_len < 1:
        p.error("--batch and --caption-len must be ≥ 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.batch, args.caption_len = 4, 6
    cfg = ModelConfig(**SMOKE_CONFIG) if args.smoke else preset(args.preset).model
    counts = step_counts(cfg, args.batch, args.caption_len)
    for name, ops in counts.items():
        print(f"{name}: {sum(ops.values())} subnormal values in one training step's op outputs")
        for op, n in list(ops.items())[:8]:
            print(f"  {n:10d}  {op}")
    product = read_product(args.batch, cfg.read_n, cfg.width, 0.05 if args.smoke else 0.5)
    print(f"read product F_y·x, ({args.batch}, {cfg.read_n}, {cfg.width}) · "
          f"({args.batch}, {cfg.width}, {cfg.width}):")
    for name in ("plain", "library"):
        print(f"  {name:8s} filterbank: {product[f'{name}_us']:8.1f} µs a call, "
              f"{product[f'{name}_subnormal_weights']} subnormal weights")
    report = {"preset": "smoke" if args.smoke else args.preset, "batch": args.batch,
              "threads": torch.get_num_threads(), "step_subnormals": counts, "read_product": product}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
