"""Fresh pages against kept memory: what ``aligndraw.allocator.keep_freed_memory`` saves.

    python benchmarks/freed_memory.py [--rows 25325 --cols 512 --repeats 30]

Each setting runs in a process of its own (the allocator setting cannot be undone): the
C library's defaults ("default"), ``keep_freed_memory()`` with glibc's settings alone
("kept", ``ALIGNDRAW_BLOCK_CACHE=0``) and with the block cache too ("cached", the library's
default). Each times, as medians over ``--repeats``
calls after two warm-ups, a zeroed (rows, cols) fp32 tensor (default: coco32's embedding
gradient, 52 MB) and that embedding's dense gradient from 2,400 looked-up words (coco32's
two directions × batch 100 × 12 words), and counts the minor page faults per call. With
``--train-steps N`` it then times N eager training steps of ``--preset``'s library model
(batch 100, after two warm-ups) and reports their faults and the process's peak resident
memory: what keeping freed memory costs in memory. Prints a table and one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aligndraw import allocator  # noqa: E402

SETTINGS = ("default", "kept", "cached")
CPU = torch.device("cpu")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rows", type=int, default=25325, help="the embedding's rows (coco32's vocabulary)")
    p.add_argument("--cols", type=int, default=512, help="the embedding's width")
    p.add_argument("--words", type=int, default=2400, help="looked-up words whose gradient is summed")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-steps", type=int, default=0,
                   help="eager training steps of --preset to time (0: none)")
    p.add_argument("--preset", choices=("mnist-captions", "coco32"), default="coco32")
    p.add_argument("--worker", choices=SETTINGS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.train_steps < 0:
        p.error("--train-steps must be ≥ 0")
    for name in ("rows", "cols", "words", "repeats", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be ≥ 1")
    return args


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(fn, repeats: int) -> dict[str, float]:
    """Median milliseconds and minor page faults per call of ``fn`` (its result freed each time)."""
    fn(), fn()
    times, faults = [], []
    for _ in range(repeats):  # not machine.timed: the result is freed after the timing, not in it
        before, start = _faults(), time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
        faults.append(_faults() - before)
        del out
    return {"ms": statistics.median(times) * 1e3, "faults": statistics.median(faults)}


def worker(args: argparse.Namespace) -> dict:
    """One setting's figures, in this process."""
    kept = allocator.keep_freed_memory() if args.worker != "default" else 0  # mmap threshold taken
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    words = torch.randint(0, args.rows, (args.words,), generator=g)
    grad = torch.randn(args.words, args.cols, generator=g)
    result = {"setting": args.worker, "kept": kept,
              "zeros": measure(lambda: torch.zeros(args.rows, args.cols), args.repeats),
              "embedding_grad": measure(lambda: torch.ops.aten.embedding_dense_backward(
                  grad, words, args.rows, 0, False), args.repeats)}
    if args.train_steps:
        result["train_step"] = train_steps(args.preset, args.train_steps)
    result["block_cache"] = allocator.block_cache_stats()  # None where not installed
    return result


def train_steps(preset_name: str, steps: int) -> dict[str, float]:
    """Median ms and faults of eager library training steps, and the peak resident MB after."""
    from aligndraw.config import preset
    from aligndraw.model import AlignDraw
    from benchmarks.throughput import Variant, random_inputs

    cfg = preset(preset_name).model
    inputs = random_inputs(cfg, 100, 12, CPU, 0)
    variant = Variant("library", AlignDraw(cfg), "fp32", inputs, 0)
    figures = measure(variant.train_step, steps)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return figures | {"peak_rss_mb": peak_mb}


def run(args: argparse.Namespace) -> dict:
    """Both settings, each in a fresh process."""
    results = {}
    for setting in SETTINGS:
        cmd = [sys.executable, __file__, "--worker", setting, "--rows", str(args.rows), "--cols",
               str(args.cols), "--words", str(args.words), "--repeats", str(args.repeats),
               "--threads", str(args.threads), "--train-steps", str(args.train_steps),
               "--preset", args.preset]
        env = os.environ | {allocator.BLOCK_CACHE_ENV: "1" if setting == "cached" else "0"}
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        results[setting] = json.loads(out.strip().splitlines()[-1])
    return {"libc": " ".join(platform.libc_ver()), "rows": args.rows, "cols": args.cols,
            "words": args.words, "repeats": args.repeats,
            "threads": args.threads, "train_steps": args.train_steps, "preset": args.preset,
            "results": results}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    report = run(args)
    mb = args.rows * args.cols * 4 / 1e6
    print(f"({args.rows}, {args.cols}) fp32 = {mb:.1f} MB, {args.threads} threads, medians of "
          f"{args.repeats}, {report['libc']}")
    print(f"{'setting':<10}{'mmap thr.':>10}{'zeros ms':>10}{'faults':>9}{'emb. grad ms':>14}{'faults':>9}")
    for name, r in report["results"].items():
        threshold = f"{r['kept'] >> 20} MiB" if r["kept"] else "glibc's"
        print(f"{name:<10}{threshold:>10}{r['zeros']['ms']:>10.2f}{r['zeros']['faults']:>9.0f}"
              f"{r['embedding_grad']['ms']:>14.2f}{r['embedding_grad']['faults']:>9.0f}")
    if args.train_steps:
        print(f"\n{args.preset}, eager library training step, batch 100, medians of {args.train_steps}:")
        for name, r in report["results"].items():
            t = r["train_step"]
            print(f"{name:<10}{t['ms']:>10.1f} ms{t['faults']:>9.0f} faults   "
                  f"peak resident {t['peak_rss_mb']:.0f} MB")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
