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
Each call eagerly and compiled in turn (every other round in reverse order), after two
untimed rounds (in the first, each compiled call compiles its graph or loads it from the
compiler's caches: its time is printed as the compile time). Prints the median ms of each,
the ratio and the difference of the results (``benchmarks.forms.relative_difference``: the
largest difference over the eager result's largest magnitude); one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
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
from benchmarks.throughput import SMOKE_CONFIG  # noqa: E402

CALLS = ("forward", "forward_from_states", "sample")


def _inputs(model: AlignDraw, rows: int, words: int) -> dict[str, torch.Tensor]:
    """Random binary images, captions of words − 3 … words real words, their caption states
    and the posterior noise, all seeded."""
    cfg, g = model.config, torch.Generator().manual_seed(0)
    images = (torch.rand(rows, cfg.channels, cfg.height, cfg.width, generator=g) > 0.8).float()
    lengths = torch.randint(max(1, words - 3), words + 1, (rows,), generator=g)
    lengths[0] = words
    tokens = torch.randint(1, cfg.vocab_size, (rows, words), generator=g)
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
    x = _inputs(model, args.rows, args.words)
    sides = {"eager": _calls(model, x),
             "compiled": _calls(compiler.FixedShapes(model, words=args.words), x)}
    times: dict[str, list[float]] = {f"{call}_{side}": [] for call in CALLS for side in sides}
    compile_s, outputs = {}, {}
    torch._dynamo.utils.counters.clear()
    for step in range(2 + repeats):  # two untimed: the first (compiling) and a second
        order = list(sides.items())
        for side, calls in order[::-1] if step % 2 else order:  # alternating
            for call, fn in calls.items():
                start = time.perf_counter()
                outputs[f"{call}_{side}"] = fn()
                seconds = time.perf_counter() - start
                if step >= 2:
                    times[f"{call}_{side}"].append(seconds)
                elif side == "compiled" and step == 0:
                    compile_s[call] = seconds
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    result: dict = {"model": label, "rows": args.rows, "words": args.words, "threads": args.threads,
                    "repeats": repeats,
                    "graphs": int(torch._dynamo.utils.counters["stats"]["unique_graphs"])}
    print(f"{label}: {args.rows} rows, captions of up to {args.words} words, {args.threads} threads, "
          f"{repeats} calls each after 2")
    for call in CALLS:
        eager, comp = outputs[f"{call}_eager"], outputs[f"{call}_compiled"]
        diff = relative_difference(comp, eager)
        e, c = ms[f"{call}_eager"], ms[f"{call}_compiled"]
        print(f"{call:20s} eager {e:7.1f} ms, compiled {c:7.1f} ms ({e / c:.2f}×; first call "
              f"{compile_s[call]:.1f} s); difference {diff:.1e}")
        result |= {f"{call}_eager_ms": e, f"{call}_compiled_ms": c, f"{call}_compile_s": compile_s[call],
                   f"{call}_diff": diff}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
