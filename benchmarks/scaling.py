"""How training and sampling cost grows with the batch, the number of drawing steps T and the
canvas size: the library model beside the naive reference, one axis at a time.

    python benchmarks/scaling.py [--preset mnist-captions] [--batches 25,50,100,200]
        [--steps 16,32,64] [--sizes 32,60,90] [--repeats 5] [--threads 2] [--compile]
        [--keep-freed-memory]

Around the preset (mnist-captions: batch 100, T = 32, 60×60; the read and write grids keep the
preset's size), each setting changes one of the three; the library model (eager fp32, or
compiled with ``--compile``) and the naive reference with the same weights alternate run by
run, as in ``throughput.py``. Per setting and phase it prints, as each setting finishes, the
median milliseconds a batch, images/s, microseconds per image and drawing step,
matrix-multiply GFLOP per image (``flops.py``), the GFLOP/s that makes, and the library's
speed-up over the reference. One JSON line last. It does not check that the two models agree
(``throughput.py`` and ``tests/test_benchmarks.py`` do, at the preset and on tiny configs).
``--keep-freed-memory`` keeps the process's freed memory for reuse, as the trainer does
(``aligndraw.allocator``), for both models, before the first setting is built.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aligndraw.config import ModelConfig  # noqa: E402
from aligndraw.model import AlignDraw  # noqa: E402
from benchmarks.flops import flops_per_image  # noqa: E402
from benchmarks.machine import BUSY_CORES, OtherLoad, keep_freed_memory, kept_note  # noqa: E402
from benchmarks.naive_reference import NaiveAlignDraw, load_from_library  # noqa: E402
from benchmarks.throughput import (  # noqa: E402
    PRESETS,
    Variant,
    compile_variant,
    even_rounds,
    log,
    model_config,
    random_inputs,
    round_robin,
)

PHASES = ("train", "sample")


def _sizes(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected whole numbers ≥ 1, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="mnist-captions")
    p.add_argument("--batches", type=_sizes, default=[25, 50, 100, 200], help="batch sizes")
    p.add_argument("--steps", type=_sizes, default=[16, 32, 64], help="drawing steps T")
    p.add_argument("--sizes", type=_sizes, default=[32, 60, 90], help="square canvas sides")
    p.add_argument("--batch", type=int, default=100, help="the batch of the T and canvas sweeps")
    p.add_argument("--caption-len", type=int, default=12, help="words per random caption")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed runs per variant and setting (an odd number gets one more: as many "
                        "rounds in each order)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per variant first")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--compile", action="store_true",
                   help="time the library compiled (aligndraw.compiler) instead of eagerly; "
                        "each setting compiles anew")
    p.add_argument("--skip-naive", action="store_true", help="time the library model only")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="keep freed memory for reuse in this process, as the trainer does "
                        "(aligndraw.allocator), for both models")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny config and sizes, 1 repeat (for CI)")
    args = p.parse_args(argv)
    if args.smoke:  # one thread: a CI machine's other jobs must not stall an OpenMP barrier
        args.batches, args.steps, args.sizes = [2, 4], [2, 3], [12, 16]
        args.batch, args.repeats, args.warmup, args.caption_len, args.threads = 3, 1, 1, 6, 1
    for name in ("batch", "repeats", "caption_len", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be ≥ 1")
    args.repeats = even_rounds(args.repeats)  # as round_robin times them (recorded so)
    if args.warmup < 0:
        p.error("--warmup must be ≥ 0")
    return args


def settings(args: argparse.Namespace, base: ModelConfig) -> list[tuple[str, int, ModelConfig, int]]:
    """(axis, value, model config, batch) for each point of the three sweeps."""
    out = [("batch", b, base, b) for b in args.batches]
    out += [("steps", t, dataclasses.replace(base, steps=t), args.batch) for t in args.steps]
    out += [("canvas", s, dataclasses.replace(base, height=s, width=s), args.batch) for s in args.sizes]
    return out


def time_setting(args: argparse.Namespace, cfg: ModelConfig, batch: int) -> dict:
    """One setting's timings: ``{phase: {variant: median seconds a batch}}`` for both phases,
    plus ``compile_s`` (the compiled library's first calls, ``{}`` eagerly) and
    ``other_processes_cores`` (cores other processes kept busy during the timed runs)."""
    device = torch.device("cpu")
    if args.compile:
        # Each setting compiles from scratch: once dynamo has seen a second batch size for the
        # same code, it would compile the next one with a dynamic batch dimension.
        torch._dynamo.reset()
    inputs = random_inputs(cfg, batch, args.caption_len, device, args.seed)
    torch.manual_seed(args.seed)
    lib = AlignDraw(cfg)
    variants = [Variant("library", lib, "fp32", inputs, args.seed, compiled=args.compile)]
    compile_s = compile_variant(variants[0], device) if args.compile else {}
    if not args.skip_naive:
        naive = load_from_library(NaiveAlignDraw(cfg), lib)
        variants.append(Variant("naive", naive, "fp32", inputs, args.seed))
    timings: dict = {"compile_s": compile_s}
    with OtherLoad() as others:  # the timed runs only: a compile's worker processes count as others
        for phase in PHASES:
            walls, _ = round_robin(variants, phase, args.warmup, args.repeats, device)
            timings[phase] = {name: statistics.median(times) for name, times in walls.items()}
    timings["other_processes_cores"] = others.cores
    return timings


def setting_fields(axis: str, value: int, cfg: ModelConfig, batch: int) -> dict:
    """What identifies a setting in its row: the swept axis and value, and all three sizes."""
    return {"axis": axis, "value": value, "batch": batch, "steps": cfg.steps, "canvas": cfg.height}


def row(axis: str, value: int, cfg: ModelConfig, batch: int, args: argparse.Namespace,
        timings: dict) -> dict:
    """The figures of one setting: per phase and variant ms a batch, images/s, µs per image and
    drawing step, achieved matmul GFLOP/s; per phase GFLOP per image and the speed-up."""
    flops = flops_per_image(cfg, args.caption_len, batch)
    out = setting_fields(axis, value, cfg, batch) | {
        "compile_s": timings["compile_s"], "other_processes_cores": timings["other_processes_cores"]}
    for phase in PHASES:
        for name, seconds in timings[phase].items():
            key = f"{phase}_{name}"
            out[f"{key}_ms"] = seconds * 1e3
            out[f"{key}_img_s"] = batch / seconds
            out[f"{key}_us_per_image_step"] = seconds * 1e6 / (batch * cfg.steps)
            out[f"{key}_gflops"] = flops[phase] * batch / seconds / 1e9
        out[f"{phase}_gflop_per_image"] = flops[phase] / 1e9
        if "naive" in timings[phase]:
            out[f"{phase}_speedup"] = timings[phase]["naive"] / timings[phase]["library"]
    return out


def table_lines(r: dict) -> list[str]:
    """One setting's rows of the printed table (one per phase), or its error."""
    if "error" in r:
        return [f"{r['axis']:>6} {r['value']:>5}  failed: {r['error']}"]
    lines = []
    for phase in PHASES:
        naive = r.get(f"{phase}_naive_ms")
        lines.append(f"{r['axis']:>6} {r['value']:>5} {phase:>6} {r[f'{phase}_gflop_per_image']:9.4f} "
                     f"{r[f'{phase}_library_ms']:8.1f} {r[f'{phase}_library_img_s']:9.1f} "
                     f"{r[f'{phase}_library_us_per_image_step']:11.2f} {r[f'{phase}_library_gflops']:11.1f} "
                     + (f"{naive:9.1f} {r[f'{phase}_speedup']:7.2f}×" if naive else f"{'-':>9} {'-':>8}"))
    return lines


TABLE_HEAD = (f"{'axis':>6} {'value':>5} {'phase':>6} {'GFLOP/img':>9} {'lib ms':>8} {'lib img/s':>9} "
              f"{'µs/img·step':>11} {'lib GFLOP/s':>11} {'naive ms':>9} {'speed-up':>8}")


def measure(args: argparse.Namespace, axis: str, value: int, cfg: ModelConfig, batch: int) -> dict:
    """``row`` of one setting; a failure (a compile that fails, say) becomes the row's error and
    the sweep goes on."""
    log(f"{axis} = {value}: batch {batch}, T = {cfg.steps}, {cfg.height}×{cfg.width}")
    try:
        return row(axis, value, cfg, batch, args, time_setting(args, cfg, batch))
    except Exception as exc:  # report it, keep the settings already measured and to come
        log(f"{axis} = {value} failed: {exc}")
        return setting_fields(axis, value, cfg, batch) | {
            "other_processes_cores": None, "error": f"{type(exc).__name__}: {str(exc)[:500]}"}


def main(argv: list[str] | None = None) -> dict:
    """Sweep, print the table (rows as they finish) and one JSON line; returns the report."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    kept = keep_freed_memory("--keep-freed-memory", args.keep_freed_memory)  # mmap threshold, or 0
    if kept:
        print(kept_note(kept))
    print(TABLE_HEAD, flush=True)
    rows = []
    for axis, value, cfg, batch in settings(args, model_config(args)):
        rows.append(measure(args, axis, value, cfg, batch))
        print("\n".join(table_lines(rows[-1])), flush=True)
    loads = [r["other_processes_cores"] for r in rows if r["other_processes_cores"] is not None]
    busiest = max(loads, default=None)
    busy = busiest is not None and busiest > BUSY_CORES
    if busy:
        print(f"WARNING: the machine was busy: other processes used up to {busiest:.2f} cores "
              f"while a setting was timed")
    report = {"preset": "smoke" if args.smoke else args.preset, "threads": args.threads,
              "compiled": args.compile, "batch": args.batch, "caption_len": args.caption_len,
              "repeats": args.repeats, "warmup": args.warmup, "seed": args.seed,
              "torch": torch.__version__, "other_processes_cores_max": busiest, "busy": busy,
              "keep_freed_memory": kept, "rows": rows}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
