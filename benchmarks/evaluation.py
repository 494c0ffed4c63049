"""Evaluation's model calls, eagerly and compiled (``aligndraw.compiler.FixedShapes``, what
``aligndraw evaluate --compile`` runs).

    python benchmarks/evaluation.py [--model mnist-captions] [--rows 100] [--words 12]
                                    [--threads 2] [--repeats 15]

Times the three calls ``aligndraw.evaluation`` makes, without gradients, on one batch of
``--rows`` random binary images and random captions of up to ``--words`` words:
- forward: the bound from word ids (nll and iwae);
- forward from caption states: the bound from given h_lang (retrieval);
- sample: images from the prior (ssim and fidelity).
Compiled, the first two share one graph (the caption encoder runs eagerly before it).
Each call eagerly and compiled in turn (``throughput.round_robin``: every other round in
reverse order, an even number of them), after two untimed rounds (in the first, each compiled
graph compiles or loads from the compiler's caches: its first call, as
``FixedShapes.compile_seconds`` timed it, is printed). Prints the median ms of each, the ratio
and the difference of the results (``benchmarks.forms.relative_difference``: the largest
difference over the eager result's largest magnitude); one JSON line last.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aligndraw import allocator, compiler  # noqa: E402
from aligndraw.checkpoint import load_model_dir  # noqa: E402
from aligndraw.config import ModelConfig  # noqa: E402
from aligndraw.model import AlignDraw  # noqa: E402
from benchmarks.forms import relative_difference  # noqa: E402
from benchmarks.throughput import SMOKE_CONFIG, even_rounds, random_inputs, round_robin  # noqa: E402

CALLS = ("forward", "forward_from_states", "sample")


def _inputs(model: AlignDraw, rows: int, words: int) -> dict[str, torch.Tensor]:
    """``throughput.random_inputs``' images and captions, cut to words − 3 … words real words
    (so that the compiled calls pad them), their caption states and the posterior noise, all
    seeded."""
    images, tokens, _ = random_inputs(model.config, rows, words, torch.device("cpu"), seed=0)
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(max(1, words - 3), words + 1, (rows,), generator=g)
    lengths[0] = words
    tokens = tokens * (torch.arange(words)[None, :] < lengths[:, None])  # (B, L), 0-padded
    with torch.no_grad():
        h_lang = model.encoder(tokens, lengths)  # (B, L, D2)
    return dict(images=images, tokens=tokens, lengths=lengths, h_lang=h_lang,
                noise=torch.randn(model.noise_shape(rows), generator=g))


def _calls(model, x: dict[str, torch.Tensor]) -> dict[str, Callable[[], torch.Tensor]]:
    """The three calls of ``model`` (eager or ``FixedShapes``), each returning a tensor."""

    @torch.no_grad()
    def forward(states: bool) -> torch.Tensor:
        return model(x["images"], x["tokens"], x["lengths"], noise=x["noise"],
                     h_lang=x["h_lang"] if states else None).bound

    return {"forward": lambda: forward(False), "forward_from_states": lambda: forward(True),
            "sample": lambda: model.sample(x["tokens"], x["lengths"], noise=x["noise"],
                                           history=False).images}


class _Side:
    """One side (eager or compiled) as ``throughput.round_robin`` runs it: a ``{call}_step``
    per call, each keeping its last result in ``outputs``."""

    worker_cpu_s = 0.0  # no worker processes

    def __init__(self, name: str, calls: dict[str, Callable[[], torch.Tensor]]) -> None:
        self.name, self.outputs = name, {}
        for call, fn in calls.items():
            setattr(self, f"{call}_step", functools.partial(self._run, call, fn))

    def _run(self, call: str, fn: Callable[[], torch.Tensor]) -> None:
        self.outputs[call] = fn()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mnist-captions", help="model directory or bundled name")
    p.add_argument("--rows", type=int, default=100, help="images (rows) per call")
    p.add_argument("--words", type=int, default=12, help="words of the longest caption")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15, help="timed calls of each")
    p.add_argument("--smoke", action="store_true", help="tiny random model, 2 repeats (for CI)")
    args = p.parse_args(argv)
    if min(args.rows, args.words, args.threads, args.repeats) < 1:
        p.error("--rows, --words, --threads and --repeats must be ≥ 1")
    torch.set_num_threads(args.threads)
    allocator.keep_freed_memory()  # as the evaluate command does
    if args.smoke:
        torch.manual_seed(0)
        model, label, repeats = AlignDraw(ModelConfig(**SMOKE_CONFIG)).eval(), "smoke", 2
    else:
        model, label, repeats = load_model_dir(args.model)[0], args.model, args.repeats
    repeats = even_rounds(repeats)  # as round_robin times them (recorded so)
    x = _inputs(model, args.rows, args.words)
    compiled = compiler.FixedShapes(model, words=args.words)
    eager, comp = _Side("eager", _calls(model, x)), _Side("compiled", _calls(compiled, x))
    torch._dynamo.utils.counters.clear()
    ms = {}
    for call in CALLS:  # two untimed rounds: the first compiles (or loads) the compiled graph
        walls, _ = round_robin([eager, comp], call, 2, repeats, torch.device("cpu"))
        ms |= {f"{call}_{side}": statistics.median(t) * 1e3 for side, t in walls.items()}
    first_calls = {graph: seconds for graph, _, seconds in compiled.compile_seconds}
    result: dict = {"model": label, "rows": args.rows, "words": args.words, "threads": args.threads,
                    "repeats": repeats, "first_call_s": first_calls,
                    "graphs": int(torch._dynamo.utils.counters["stats"]["unique_graphs"])}
    print(f"{label}: {args.rows} rows, captions of up to {args.words} words, {args.threads} threads, "
          f"{repeats} calls each after 2")
    for call in CALLS:
        diff = relative_difference(comp.outputs[call], eager.outputs[call])
        e, c = ms[f"{call}_eager"], ms[f"{call}_compiled"]
        print(f"{call:20s} eager {e:7.1f} ms, compiled {c:7.1f} ms ({e / c:.2f}×); difference {diff:.1e}")
        result |= {f"{call}_eager_ms": e, f"{call}_compiled_ms": c, f"{call}_diff": diff}
    for graph, seconds in first_calls.items():
        print(f"first call of the compiled {graph!r} graph (compiling or loading it): {seconds:.1f} s")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
