"""The training step's update (per-tensor gradient clipping, then the paper's RMSProp step) for
a preset's parameters, eagerly and compiled (``aligndraw.trainer.Update``).

    python benchmarks/update.py [--preset coco32] [--threads 2] [--repeats 15]

Both updates start from the same weights and take the same steps, with fresh gradients before
each (as after a backward pass), alternating eager and compiled; prints the median ms of each,
their ratio and the largest relative difference of the weights after the last step; one JSON
line last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aligndraw.config import ModelConfig, preset  # noqa: E402
from aligndraw.model import AlignDraw  # noqa: E402
from aligndraw.trainer import PaperRMSprop, Update  # noqa: E402
from benchmarks.forms import relative_difference  # noqa: E402
from benchmarks.machine import timed  # noqa: E402
from benchmarks.throughput import CLIP_NORM, SMOKE_CONFIG  # noqa: E402


def _updates(cfg: ModelConfig, compiled: bool) -> tuple[list[torch.nn.Parameter], Update]:
    torch.manual_seed(0)
    params = [p for p in AlignDraw(cfg).parameters() if p.requires_grad]
    return params, Update(PaperRMSprop(params, lr=1e-3), CLIP_NORM, compiled=compiled)


def _timed_step(params: list[torch.nn.Parameter], update: Update, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    for p in params:  # fresh gradients, N(0, 1): tensors of over 100 values are clipped
        p.grad = torch.randn(p.shape, generator=gen)
    return timed(update, torch.device("cpu"))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="coco32", choices=("mnist-captions", "coco32"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15, help="timed steps of each")
    p.add_argument("--smoke", action="store_true", help="tiny config, 2 repeats (for CI)")
    args = p.parse_args(argv)
    if args.threads < 1 or args.repeats < 1:
        p.error("--threads and --repeats must be ≥ 1")
    torch.set_num_threads(args.threads)
    cfg = ModelConfig(**SMOKE_CONFIG) if args.smoke else preset(args.preset).model
    repeats = 2 if args.smoke else args.repeats
    sides = {"eager": _updates(cfg, False), "compiled": _updates(cfg, True)}
    numel = sum(p.numel() for p in sides["eager"][0])
    times: dict[str, list[float]] = {name: [] for name in sides}
    compile_s = 0.0
    torch._dynamo.utils.counters.clear()
    for step in range(2 + repeats):  # two untimed: the state, then the compile
        order = list(sides.items())
        for name, (params, update) in order[::-1] if step % 2 else order:  # alternating
            seconds = _timed_step(params, update, seed=step)
            if step >= 2:
                times[name].append(seconds)
            elif name == "compiled" and step == 1:
                compile_s = seconds
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    pairs = zip(sides["eager"][0], sides["compiled"][0], strict=True)
    diff = max(relative_difference(c, e) for e, c in pairs)
    label = "smoke" if args.smoke else args.preset
    graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    print(f"{label}: {numel / 1e6:.2f}M parameters in {len(sides['eager'][0])} tensors, "
          f"{args.threads} threads, {repeats} steps each after 2")
    print(f"eager {ms['eager']:.1f} ms, compiled {ms['compiled']:.1f} ms "
          f"({ms['eager'] / ms['compiled']:.2f}×; compiled in {compile_s:.1f} s, graphs {graphs}); "
          f"weights' largest relative difference {diff:.1e}")
    result = {"preset": label, "graphs": graphs, "threads": args.threads, "repeats": repeats,
              "parameters": numel, "eager_ms": ms["eager"], "compiled_ms": ms["compiled"],
              "compile_s": compile_s,
              "max_rel_diff": diff}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
