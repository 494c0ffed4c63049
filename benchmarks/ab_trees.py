"""A/B of two source trees of this project: the library's training step and sampling batch, side by side.

    git worktree add /tmp/base HEAD~1
    python benchmarks/ab_trees.py --a /tmp/base --b . [--compile] [--repeats 11]
    python benchmarks/ab_trees.py --a . --b . --compile --inductor-b cpp_wrapper=true
    python benchmarks/ab_trees.py --a . --b . --compile --plain-a --precision bf16
    python benchmarks/ab_trees.py --a . --b . --compile --gemm-b aten
    python benchmarks/ab_trees.py --a . --b . --compile --env-b OMP_PROC_BIND=true
    python benchmarks/ab_trees.py --a . --b . --compile --threads-a 1 --threads-b 2

Each tree runs in a worker process of its own (its ``src/`` and ``benchmarks/`` first on the
path), built like ``throughput.py``'s library variant (same preset, seed, batch of random
inputs, trainer step). The two workers take turns, one step each (``throughput.round_robin``,
after a first, timed call), so both see the same machine; the waiting one sleeps on a pipe.
With ``--compile`` each tree first compiles in a worker of its own, which then exits, and the
timed workers load the graphs from inductor's cache: a worker that compiled cold was measured
3–5 % slower than one that loaded the same code from the cache (``--no-warm-cache`` skips
this; ``recompiled`` in the JSON, and a warning, tells when a timed worker still compiled).
Other processes' load is measured as in ``throughput.py``, over the timed rounds only
(``busy`` in the JSON, and a warning). ``--inductor-a`` / ``--inductor-b KEY=VALUE`` set
``torch._inductor.config`` entries in one worker before it compiles (VALUE as JSON, else a
string), so the same tree can also be compared with itself under other compiler settings;
``--plain-a`` / ``--plain-b`` compile that worker's model with plain ``torch.compile``, without
``aligndraw.compiler``'s graph pass; ``--gemm-a`` / ``--gemm-b`` choose that worker's CPU fp32
product backend (``aligndraw.gemm``: ``onednn``, ``openblas`` or ``aten``, set as ``ALIGNDRAW_CPU_GEMM``
before it imports the library); ``--env-a`` / ``--env-b KEY=VALUE`` add environment variables
to that worker's process from its start (settings read once when a library loads, such as
OpenMP's ``OMP_*``; not ``OMP_NUM_THREADS``: a worker sets its threads itself, ``--threads``, or
``--threads-a`` / ``--threads-b`` for one, reported as ``a_threads`` / ``b_threads``).
``--precision bf16`` runs both under autocast.
Prints medians, min/max, B's speed-up by medians, by paired runs and how often B was the
faster of a pair, and by blocks of two rounds in both orders (``pairs.balanced``, the figure
to read: the first run of a round follows the same worker's run, the second the other
worker's, and sampling ran up to 1.2× slower second than first), with how much slower the
second run of a round was; then one JSON line last (with the package directory each worker
imported).
This is how a change to the library is measured against the code before it, compiled code
too (within one process, dynamo's guards and recompiles would decide which graph runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PHASES = ("train", "sample")


def _key_values(items: list[str], what: str) -> dict[str, str]:
    """``KEY=VALUE`` strings → {KEY: VALUE}; ValueError naming ``what`` for anything else."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{what} are KEY=VALUE, got {item!r}")
        out[key] = raw
    return out


def inductor_settings(items: list[str]) -> dict:
    """``KEY=VALUE`` strings → {KEY: VALUE parsed as JSON, else the string}."""
    settings = {}
    for key, raw in _key_values(items, "inductor settings").items():
        try:
            settings[key] = json.loads(raw)
        except json.JSONDecodeError:
            settings[key] = raw
    return settings


def environment(items: list[str]) -> dict[str, str]:
    """``--env-a`` / ``--env-b`` items → the variables they add to a worker's environment."""
    return _key_values(items, "environment variables")


def batch_size(args: argparse.Namespace) -> int:
    """Images per step: ``--batch``, else 100 (8 with ``--smoke``)."""
    return args.batch or (8 if args.smoke else 100)


def worker(tree: Path, args: argparse.Namespace, inductor: dict) -> None:
    """Serve steps of ``tree``'s library model: say where its ``aligndraw`` came from, then read a
    phase name per line and print the step's wall and CPU seconds and how many graphs inductor
    compiled so far (its graph cache's misses).

    In a worker process its own settings are the "a" ones (``--inductor-a``, ``--plain-a``,
    ``--gemm-a``, ``--keep-freed-memory-a``)."""
    sys.path[:0] = [str(tree / "src"), str(tree)]
    if args.gemm_a:
        os.environ["ALIGNDRAW_CPU_GEMM"] = args.gemm_a  # read when aligndraw.gemm is imported
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
    if args.keep_freed_memory_a:  # as the trainer does, before the model is built
        # not benchmarks.machine.keep_freed_memory: that is the tree's, and older trees lack it
        from aligndraw import allocator

        if not allocator.keep_freed_memory():
            raise SystemExit("this C library refused aligndraw.allocator's settings")
    torch.set_num_threads(args.threads)  # _Worker passes this worker's own (--threads-x) as --threads
    cfg = ModelConfig(**SMOKE_CONFIG) if args.smoke else preset(args.preset).model
    inputs = random_inputs(cfg, batch_size(args), 6 if args.smoke else 12, torch.device("cpu"), 0)
    torch.manual_seed(0)
    variant = Variant(tree.name, AlignDraw(cfg), args.precision, inputs, seed=0, compiled=args.compile,
                      stack_products=not args.plain_a)
    from aligndraw import gemm

    built = inputs[0].shape[0]  # the images' batch, as built
    print(f"ready {gemm.backend()} {built} {torch.get_num_threads()} "
          f"{Path(aligndraw.__file__).resolve().parent}", flush=True)
    for line in sys.stdin:
        wall, cpu = time.perf_counter(), time.process_time()
        getattr(variant, f"{line.strip()}_step")()
        misses = torch._dynamo.utils.counters["inductor"]["fxgraph_cache_miss"]
        print(time.perf_counter() - wall, time.process_time() - cpu, misses, flush=True)


class _Worker:
    """One tree's worker process, with a variant's interface (``train_step``, ``sample_step``,
    ``pids``, ``worker_cpu_s``) for ``throughput.round_robin``."""

    def __init__(self, name: str, tree: Path, inductor: list[str], plain: bool, gemm: str | None,
                 args: argparse.Namespace) -> None:
        cmd = [sys.executable, __file__, "--worker", str(tree), "--preset", args.preset,
               "--threads", str(getattr(args, f"threads_{name}")), "--precision", args.precision]
        cmd += ["--batch", str(args.batch)] if args.batch else []
        cmd += ["--compile"] * args.compile + ["--smoke"] * args.smoke + ["--plain-a"] * plain
        cmd += [f"--inductor-a={item}" for item in inductor]
        cmd += ["--gemm-a", gemm] if gemm else []
        cmd += ["--keep-freed-memory-a"] * getattr(args, f"keep_freed_memory_{name}")
        self.name, self.worker_cpu_s, self.compiled_graphs = name, 0.0, 0
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=os.environ | getattr(args, f"env_{name}"))
        self.pids = (self.proc.pid,)
        # its product backend, the batch it built, its threads and where its aligndraw came from
        self.gemm, batch, threads, self.package = self._read().removeprefix("ready ").split(" ", 3)
        self.batch, self.threads = int(batch), int(threads)

    def _read(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} stopped (exit status {self.proc.wait()})")
        return line.strip()

    def _step(self, phase: str) -> None:
        self.proc.stdin.write(phase + "\n")
        self.proc.stdin.flush()
        fields = self._read().split()  # the wall time is the caller's
        self.worker_cpu_s, self.compiled_graphs = float(fields[1]), int(fields[2])

    def train_step(self) -> None:
        self._step("train")

    def sample_step(self) -> None:
        self._step("sample")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def compare(args: argparse.Namespace) -> dict:
    """With --compile a warm-up worker per tree first; then both timed workers, first calls
    timed, then ``round_robin``; medians and pairs."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this tree's benchmarks
    import torch

    from benchmarks.machine import BUSY_CORES, OtherLoad, kernel_environment, timed
    from benchmarks.throughput import round_robin

    cpu = torch.device("cpu")

    def start(name: str) -> _Worker:
        return _Worker(name, getattr(args, name), getattr(args, f"inductor_{name}"),
                       getattr(args, f"plain_{name}"), getattr(args, f"gemm_{name}"), args)

    warm_up_s = {}
    if args.compile and not args.no_warm_cache:
        # a worker that compiled cold ran its steps 3–5 % slower than one that loaded the same
        # graphs from inductor's cache (docs/performance-log.md): compile both first, in processes
        # of their own, so that the timed workers both load from the cache
        for name in ("a", "b"):
            w = start(name)
            try:
                # two training steps: the update (clip, step) is compiled at the second
                warm_up_s[name] = timed(lambda w=w: (w.train_step(), w.train_step(), w.sample_step()), cpu)
            finally:
                w.close()
    workers: list[_Worker] = []
    result: dict = {"a": str(args.a), "b": str(args.b), "compile": args.compile, "preset": args.preset,
                    "batch": batch_size(args), "precision": args.precision,
                    "plain_a": args.plain_a, "plain_b": args.plain_b,
                    "inductor_a": inductor_settings(args.inductor_a),
                    "inductor_b": inductor_settings(args.inductor_b),
                    "env_a": args.env_a, "env_b": args.env_b,
                    # each worker's kernel variables as it starts (its --gemm-x is a_gemm / b_gemm)
                    "kernel_env_a": kernel_environment(os.environ | args.env_a),
                    "kernel_env_b": kernel_environment(os.environ | args.env_b),
                    "keep_freed_memory_a": args.keep_freed_memory_a,
                    "keep_freed_memory_b": args.keep_freed_memory_b}
    result |= {f"warm_up_{name}_s": seconds for name, seconds in warm_up_s.items()}
    loads = []  # other processes' cores per phase, over the timed rounds only: a compile's
    try:        # worker processes (children of a worker) would count as others
        for name in ("a", "b"):
            workers.append(start(name))
        result |= {f"{w.name}_package": w.package for w in workers}
        result |= {f"{w.name}_gemm": w.gemm for w in workers}
        result |= {f"{w.name}_batch": w.batch for w in workers}
        result |= {f"{w.name}_threads": w.threads for w in workers}
        for phase in PHASES:
            for w in workers:  # with --compile: loading the graphs (or, without the warm-up, the compile)
                result[f"{phase}_{w.name}_first_s"] = timed(getattr(w, f"{phase}_step"), cpu)
            with OtherLoad(own_pids=[w.pids[0] for w in workers]) as others:
                walls, _ = round_robin(workers, phase, 1, args.repeats, cpu)
            loads.append(others.cores)
            result |= _summary(phase, walls["a"], walls["b"])
    finally:
        for w in workers:
            w.close()
    if warm_up_s:  # graphs a timed worker compiled although its warm-up had
        result["recompiled"] = {w.name: w.compiled_graphs > 0 for w in workers}
        for name in (n for n, again in result["recompiled"].items() if again):
            print(f"WARNING: worker {name} compiled again after its warm-up (inductor's cache "
                  "did not serve its graphs): it may run slower than a worker that loaded them")
    result["other_processes_cores"] = None if None in loads else max(loads)
    load = result["other_processes_cores"]
    result["busy"] = load is not None and load > BUSY_CORES
    if result["busy"]:
        print(f"WARNING: the machine was busy (other processes used {load:.2f} cores on "
              "average): the times are unreliable; rerun on an idle machine")
    print(json.dumps(result))
    return result


def _summary(phase: str, a: list[float], b: list[float]) -> dict:
    """Medians (ms), B's speed-up by medians, by paired runs (``pairs.paired``: with a 95 %
    interval, the pairs B won and the sign test's p-value) and by blocks of both orders
    (``pairs.balanced``, with ``second_run_cost``); printed too. ``a`` and ``b`` in timed
    order, A first in the first round (``throughput.round_robin``)."""
    from benchmarks.pairs import balanced, describe, describe_balanced, paired, second_run_cost
    from benchmarks.throughput import reversed_round

    out = {f"{phase}_{name}_median_ms": statistics.median(ts) * 1e3 for name, ts in (("a", a), ("b", b))}
    for name, ts in (("a", a), ("b", b)):
        print(f"{phase} {name}: median {out[f'{phase}_{name}_median_ms']:.1f} ms, "
              f"min {min(ts) * 1e3:.1f}, max {max(ts) * 1e3:.1f}")
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    pairs = paired(ratios)
    out[f"{phase}_b_over_a"] = statistics.median(a) / statistics.median(b)
    out |= {f"{phase}_b_over_a_paired": pairs["median"], f"{phase}_b_over_a_paired_ci95": pairs["ci95"],
            f"{phase}_b_faster_pairs": pairs["wins"], f"{phase}_sign_test_p": pairs["sign_test_p"]}
    print(f"{phase}: B {out[f'{phase}_b_over_a']:.3f}× A by medians ({describe(pairs)} of {len(a)} pairs)")
    blocks = balanced(ratios)
    second = second_run_cost(ratios, [reversed_round(i) for i in range(len(ratios))])
    if blocks is not None:
        out |= {f"{phase}_b_over_a_balanced": blocks["median"],
                f"{phase}_b_over_a_balanced_ci95": blocks["ci95"],
                f"{phase}_b_faster_blocks": blocks["wins"], f"{phase}_blocks": blocks["blocks"],
                f"{phase}_balanced_sign_test_p": blocks["sign_test_p"],
                f"{phase}_second_run_cost": second}
    print(f"{phase}: B over A {describe_balanced(blocks, second)}")
    return out


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--a", type=Path, help="source tree A (e.g. a git worktree of the base commit)")
    p.add_argument("--b", type=Path, help="source tree B")
    p.add_argument("--preset", default="mnist-captions", choices=("mnist-captions", "coco32"))
    p.add_argument("--compile", action="store_true", help="compile both (aligndraw.compiler)")
    p.add_argument("--repeats", type=int, default=11,
                   help="timed steps per tree and phase (an odd number gets one more: as many rounds "
                        "in each order)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads of each worker (--threads-a / --threads-b set one's own)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16 = torch.autocast(bfloat16) around forward / sample, in both")
    p.add_argument("--smoke", action="store_true", help="tiny config and batch (for CI)")
    p.add_argument("--batch", type=int, default=None,
                   help="images per step (default 100, 8 with --smoke); 1 measures what a step "
                        "costs beside its arithmetic (dispatch, autograd, Python)")
    p.add_argument("--no-warm-cache", action="store_true",
                   help="with --compile: time the workers that compiled (by default each tree "
                        "compiles first in a process of its own, and the timed workers load "
                        "from inductor's cache)")
    for name in ("a", "b"):
        p.add_argument(f"--inductor-{name}", action="append", default=[], metavar="KEY=VALUE",
                       help=f"a torch._inductor.config setting for {name.upper()}'s worker (repeatable)")
        p.add_argument(f"--plain-{name}", action="store_true",
                       help=f"compile {name.upper()} with plain torch.compile (no aligndraw.compiler pass)")
        p.add_argument(f"--gemm-{name}", choices=("onednn", "openblas", "aten"),
                       help=f"{name.upper()}'s CPU fp32 product backend (default: the library's)")
        p.add_argument(f"--threads-{name}", type=int, default=None,
                       help=f"{name.upper()}'s torch threads (default: --threads; an OMP_NUM_THREADS "
                            f"in --env-{name} does not set them)")
        p.add_argument(f"--env-{name}", action="append", default=[], metavar="KEY=VALUE",
                       help=f"an environment variable for {name.upper()}'s worker process (repeatable)")
        p.add_argument(f"--keep-freed-memory-{name}", action="store_true",
                       help=f"{name.upper()}'s worker keeps freed memory for reuse, as the trainer does "
                            "(aligndraw.allocator; the tree must have it)")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        settings = {name: inductor_settings(getattr(args, f"inductor_{name}")) for name in ("a", "b")}
        for name in ("a", "b"):  # parsed once: {KEY: VALUE} from here on
            setattr(args, f"env_{name}", environment(getattr(args, f"env_{name}")))
    except ValueError as err:
        p.error(str(err))
    import torch._inductor.config as inductor_config

    known = inductor_config.get_config_copy()
    for key in [k for both in settings.values() for k in both if k not in known]:
        p.error(f"torch._inductor.config has no setting {key!r} (e.g. cpp_wrapper, "
                "cpp_wrapper_build_separate, cpp.threads)")
    if (args.plain_a or args.plain_b) and not args.compile:
        p.error("--plain-a / --plain-b choose how to compile: add --compile")
    if args.no_warm_cache and not args.compile:
        p.error("--no-warm-cache concerns compiled graphs: add --compile")
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
    if args.batch is not None and args.batch < 1:
        p.error(f"--batch must be at least 1, got {args.batch}")
    _threads(p, args)
    return compare(args)


def _threads(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Each worker's threads: its own ``--threads-x``, else ``--threads``; at least 1."""
    for flag, value in (("threads", args.threads), ("threads-a", args.threads_a),
                        ("threads-b", args.threads_b)):
        if value is not None and value < 1:
            p.error(f"--{flag} must be at least 1, got {value}")
    for name in ("a", "b"):
        if getattr(args, f"threads_{name}") is None:
            setattr(args, f"threads_{name}", args.threads)


if __name__ == "__main__":
    main()
