"""A/B of two source trees of this project: the library's training step and sampling batch, side by side.

    git worktree add /tmp/base HEAD~1
    python benchmarks/ab_trees.py --a /tmp/base --b . [--compile] [--repeats 11]
    python benchmarks/ab_trees.py --a . --b . --compile --inductor-b cpp_wrapper=true
    python benchmarks/ab_trees.py --a . --b . --compile --plain-a --precision bf16

Each tree runs in a worker process of its own (its ``src/`` and ``benchmarks/`` first on the
path), built like ``throughput.py``'s library variant (same preset, seed, batch of random
inputs, trainer step). The two workers take turns, one step each, so both see the same
machine; the waiting one sleeps on a pipe. ``--inductor-a`` / ``--inductor-b KEY=VALUE`` set
``torch._inductor.config`` entries in one worker before it compiles (VALUE as JSON, else a
string), so the same tree can also be compared with itself under other compiler settings;
``--plain-a`` / ``--plain-b`` compile that worker's model with plain ``torch.compile``, without
``aligndraw.compiler``'s graph pass. ``--precision bf16`` runs both under autocast.
Prints medians, min/max and how often B was the faster of a pair, then one JSON line last.
This is how a change to the library is measured against the code before it, compiled code
too (within one process, dynamo's guards and recompiles would decide which graph runs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

PHASES = ("train", "sample")


def inductor_settings(items: list[str]) -> dict:
    """``KEY=VALUE`` strings → {KEY: VALUE parsed as JSON, else the string}."""
    settings = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"inductor settings are KEY=VALUE, got {item!r}")
        try:
            settings[key] = json.loads(raw)
        except json.JSONDecodeError:
            settings[key] = raw
    return settings


def worker(tree: Path, args: argparse.Namespace, inductor: dict) -> None:
    """Serve steps of ``tree``'s library model: read a phase name per line, print its seconds.

    In a worker process its own settings are the "a" ones (``--inductor-a``, ``--plain-a``)."""
    sys.path[:0] = [str(tree / "src"), str(tree)]
    import torch
    import torch._inductor.config as inductor_config

    for key, value in inductor.items():
        setattr(inductor_config, key, value)

    import aligndraw
    from aligndraw.config import ModelConfig, preset
    from aligndraw.model import AlignDraw
    from benchmarks.throughput import SMOKE_CONFIG, Variant, random_inputs

    if not Path(aligndraw.__file__).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"worker for {tree} imported aligndraw from {aligndraw.__file__}")
    torch.set_num_threads(args.threads)
    cfg = ModelConfig(**SMOKE_CONFIG) if args.smoke else preset(args.preset).model
    inputs = random_inputs(cfg, 8 if args.smoke else 100, 6 if args.smoke else 12, torch.device("cpu"), 0)
    torch.manual_seed(0)
    variant = Variant(tree.name, AlignDraw(cfg), args.precision, inputs, seed=0, compiled=args.compile,
                      stack_products=not args.plain_a)
    for line in sys.stdin:
        start = time.perf_counter()
        getattr(variant, f"{line.strip()}_step")()
        print(time.perf_counter() - start, flush=True)


class _Worker:
    def __init__(self, tree: Path, inductor: list[str], plain: bool, args: argparse.Namespace) -> None:
        cmd = [sys.executable, __file__, "--worker", str(tree), "--preset", args.preset,
               "--threads", str(args.threads), "--precision", args.precision]
        cmd += ["--compile"] * args.compile + ["--smoke"] * args.smoke + ["--plain-a"] * plain
        cmd += [f"--inductor-a={item}" for item in inductor]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def step(self, phase: str) -> float:
        self.proc.stdin.write(phase + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"a worker stopped (exit status {self.proc.wait()})")
        return float(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def compare(args: argparse.Namespace) -> dict:
    workers = {name: _Worker(getattr(args, name), getattr(args, f"inductor_{name}"),
                             getattr(args, f"plain_{name}"), args) for name in ("a", "b")}
    result: dict = {"a": str(args.a), "b": str(args.b), "compile": args.compile, "preset": args.preset,
                    "precision": args.precision, "plain_a": args.plain_a, "plain_b": args.plain_b,
                    "inductor_a": inductor_settings(args.inductor_a),
                    "inductor_b": inductor_settings(args.inductor_b)}
    try:
        for phase in PHASES:
            for name, w in workers.items():  # warm-up (with --compile: the compile)
                result[f"{phase}_{name}_first_s"] = w.step(phase)
                w.step(phase)
            times = {name: [] for name in workers}
            for _ in range(args.repeats):
                for name, w in workers.items():
                    times[name].append(w.step(phase))
            for name, ts in times.items():
                result[f"{phase}_{name}_median_ms"] = statistics.median(ts) * 1e3
                print(f"{phase} {name}: median {statistics.median(ts) * 1e3:.1f} ms, "
                      f"min {min(ts) * 1e3:.1f}, max {max(ts) * 1e3:.1f}")
            wins = sum(b < a for a, b in zip(times["a"], times["b"], strict=True))
            result[f"{phase}_b_faster_pairs"] = wins
            result[f"{phase}_b_over_a"] = result[f"{phase}_a_median_ms"] / result[f"{phase}_b_median_ms"]
            print(f"{phase}: B {result[f'{phase}_b_over_a']:.3f}× A by medians, "
                  f"faster in {wins} of {args.repeats} pairs")
    finally:
        for w in workers.values():
            w.close()
    print(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--a", type=Path, help="source tree A (e.g. a git worktree of the base commit)")
    p.add_argument("--b", type=Path, help="source tree B")
    p.add_argument("--preset", default="mnist-captions", choices=("mnist-captions", "coco32"))
    p.add_argument("--compile", action="store_true", help="compile both (aligndraw.compiler)")
    p.add_argument("--repeats", type=int, default=11, help="timed steps per tree and phase")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each worker")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16 = torch.autocast(bfloat16) around forward / sample, in both")
    p.add_argument("--smoke", action="store_true", help="tiny config and batch (for CI)")
    for name in ("a", "b"):
        p.add_argument(f"--inductor-{name}", action="append", default=[], metavar="KEY=VALUE",
                       help=f"a torch._inductor.config setting for {name.upper()}'s worker (repeatable)")
        p.add_argument(f"--plain-{name}", action="store_true",
                       help=f"compile {name.upper()} with plain torch.compile (no aligndraw.compiler pass)")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        settings = {name: inductor_settings(getattr(args, f"inductor_{name}")) for name in ("a", "b")}
    except ValueError as err:
        p.error(str(err))
    import torch._inductor.config as inductor_config

    known = inductor_config.get_config_copy()
    for key in [k for both in settings.values() for k in both if k not in known]:
        p.error(f"torch._inductor.config has no setting {key!r} (e.g. cpp_wrapper, "
                "cpp_wrapper_build_separate, cpp.threads)")
    if (args.plain_a or args.plain_b) and not args.compile:
        p.error("--plain-a / --plain-b choose how to compile: add --compile")
    if args.worker is not None:
        worker(args.worker, args, settings["a"])
        return None
    for name in ("a", "b"):
        tree = getattr(args, name)
        if tree is None or not (tree / "src" / "aligndraw" / "model.py").is_file():
            p.error(f"--{name} must be a source tree of this project (with src/aligndraw/model.py), "
                    f"got {tree}")
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    return compare(args)


if __name__ == "__main__":
    main()
