"""Where a step's CPU time goes below PyTorch: Linux ``perf`` sampling every thread of the process.

    python benchmarks/native_profile.py --preset mnist-captions --compile [--phase sample] [--seconds 8]
        [--keep-freed-memory]

``profile_step.py`` sees ops and compiled kernels; this sees the machine code under them, per
thread: MKL's products (``mkl_blas_*``; PyTorch links MKL into ``libtorch_cpu``, where its
symbols are told by their prefixes, ``MKL_PREFIX``) and its other code, OpenBLAS's products
(numpy's OpenBLAS and the op that calls it, ``aligndraw.openblas``), the vector math that
compiled kernels and PyTorch's ops call (SLEEF's ``Sleef_*``), the compiled kernels (inductor's
``.so`` files), PyTorch's own ops, its dispatch and bindings, the C library (malloc, memcpy),
the interpreter, the kernel, and OpenMP's runtime (``libgomp``): a thread there probably
spins waiting for the others or for the next parallel region, or starts or ends one (its
symbols are not resolved; a thread that sleeps is not sampled). It runs the trainer's step
(or a sampling batch) after warm-up steps, records ``perf record -F FREQ -p PID`` while steps
run for ``--seconds``, and prints:

- steps per second while recorded, and each thread's share of the samples;
- the samples by library, per thread, and the top symbols;
- for the samples in which a thread waits in OpenMP's runtime, what the other threads run at
  that moment (the nearest sample of each within half a sampling period): the serial or
  unbalanced work that keeps the team waiting;
- one JSON line last: steps, seconds, samples per thread, each thread's shares by kind and
  the shares by kind of what runs while a thread waits, and the mmap threshold taken with
  ``--keep-freed-memory`` (0 without: the step's buffers then come from fresh pages, whose
  page faults the trainer, which keeps freed memory on the CPU, does not pay).

Needs ``perf`` (Linux; ``kernel.perf_event_paranoid`` low enough to record this process).
"""

from __future__ import annotations

import argparse
import bisect
import collections
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import keep_freed_memory, kept_note  # noqa: E402
from benchmarks.profile_step import add_step_args, build_variant, check_step_args  # noqa: E402

# perf script -F tid,time,ip,sym,dso: "  7842 63312.568789:  7fc96d01e02a sym (/path/lib.so)"
# (a C++ symbol may hold spaces and parentheses; the library is the last parenthesised part)
SAMPLE = re.compile(r"\s*(\d+)\s+([\d.]+):\s+[0-9a-f]+\s+(.*)\s+\(([^()]*)\)\s*$")
OPENMP = "OpenMP runtime (waits)"
# MKL's symbols inside libtorch_cpu: its API and kernels (mkl_*), its threaded GEMM driver
# (gblock_*), its vector math's internal paths (vsexp_cout_rare and the like)
MKL_PREFIX = re.compile(r"mkl_|gblock_|v[sdcz][a-z0-9]+_[a-z0-9_]+$")


@dataclass(frozen=True)
class Sample:
    """One perf sample: thread id, time (s), symbol, the library it is in, and its kind
    (``library_kind``, worked out once when the line is read)."""

    tid: int
    time: float
    symbol: str
    library: str
    kind: str


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The step's options (``profile_step.add_step_args``) and the recording's."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_step_args(p)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--phase", choices=("train", "sample"), default="train")
    p.add_argument("--warmup", type=int, default=4,
                   help="steps before recording (with --compile at least 1 for sampling and 2 for "
                        "training: the first compiles the model, the second the update)")
    p.add_argument("--seconds", type=float, default=8.0, help="how long to record steps")
    p.add_argument("--frequency", type=int, default=1999, help="perf samples per second and thread")
    args = p.parse_args(argv)
    check_step_args(p, args)
    least = (2 if args.phase == "train" else 1) if args.compile else 0
    if args.warmup < least:
        p.error(f"--warmup must be at least {least} with --compile and --phase {args.phase} (the "
                f"steps that compile), got {args.warmup}" if least else
                f"--warmup must be 0 or more, got {args.warmup}")
    for name in ("seconds", "frequency", "threads"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    return args


@functools.cache
def perf_binary() -> str:
    """The ``perf`` executable, or a ``SystemExit`` that says what is missing."""
    path = shutil.which("perf")
    if path is None:
        raise SystemExit("native_profile.py needs Linux perf, and no 'perf' is on PATH "
                         "(Debian/Ubuntu: the linux-perf or linux-tools package)")
    return path


def library_kind(library: str, symbol: str) -> str:
    """A sample's kind, from its library's file name and, inside ``libtorch_cpu`` (which holds
    MKL and SLEEF too), its symbol's prefix (``MKL_PREFIX``, ``Sleef_``)."""
    name = Path(library).name
    if name.startswith(("libgomp", "libiomp")):
        return OPENMP
    if symbol.startswith("Sleef_"):
        return "vector math (SLEEF)"
    if name.startswith("libmkl") or (name.startswith("libtorch_cpu") and MKL_PREFIX.match(symbol)):
        return "MKL products" if symbol.startswith(("mkl_blas", "gblock_")) else "MKL, other"
    if name.startswith("libtorch_cpu"):
        return "PyTorch ops (libtorch_cpu)"
    if "openblas" in name.lower():  # numpy's OpenBLAS, and the op that calls it (aligndraw.openblas)
        return "OpenBLAS products"
    if name.startswith(("libc10", "libtorch_python")):
        return "PyTorch dispatch and bindings"
    if name.endswith(".main.so") or "torchinductor" in library:
        return "compiled kernels and their wrapper"
    if name.startswith(("libc.so", "libc-", "libm.so")):
        return "C library (malloc, memcpy)"
    if name.startswith(("libpython", "python")):
        return "interpreter"
    if library.startswith("[kernel"):
        return "kernel"
    return "other"


def parse_samples(lines) -> tuple[list[Sample], int]:
    """``perf script -F tid,time,ip,sym,dso`` lines → (samples, how many non-blank lines did
    not parse)."""
    out, skipped = [], 0
    for line in lines:
        m = SAMPLE.match(line)
        if m:
            tid, t, symbol, library = m.groups()
            out.append(Sample(int(tid), float(t), symbol, library, library_kind(library, symbol)))
        elif line.strip():
            skipped += 1
    return out, skipped


def shares(samples: list[Sample], key) -> dict[str, collections.Counter]:
    """Per thread id (as a string) and "all": a Counter of key(sample)."""
    out: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for s in samples:
        k = key(s)
        out[str(s.tid)][k] += 1
        out["all"][k] += 1
    return dict(out)


def while_waiting(samples: list[Sample], window: float) -> collections.Counter:
    """What the other threads run when a thread waits in OpenMP's runtime: for each such sample,
    the nearest sample of every other thread within ``window`` seconds, counted by (kind, symbol)."""
    by_tid: dict[int, list[Sample]] = collections.defaultdict(list)
    for s in sorted(samples, key=lambda s: s.time):
        by_tid[s.tid].append(s)
    times = {tid: [s.time for s in ss] for tid, ss in by_tid.items()}
    found: collections.Counter = collections.Counter()
    for s in samples:
        if s.kind != OPENMP:
            continue
        for tid, ts in times.items():
            if tid == s.tid:
                continue
            i = bisect.bisect_left(ts, s.time)
            near = min((j for j in (i - 1, i) if 0 <= j < len(ts)), key=lambda j: abs(ts[j] - s.time),
                       default=None)
            if near is not None and abs(ts[near] - s.time) <= window:
                o = by_tid[tid][near]
                found[(o.kind, o.symbol)] += 1
    return found


def record(step, seconds: float, frequency: int, data: Path) -> tuple[int, float]:
    """Run ``step`` for ``seconds`` under ``perf record`` of this process; (steps, seconds).
    perf is stopped (and, if it does not stop, killed) whatever the steps do."""
    cmd = [perf_binary(), "record", "-q", "-F", str(frequency), "-p", str(os.getpid()), "-o", str(data)]
    perf = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # perf attaches to every thread before the first timed step
        if perf.poll() is not None:
            err = perf.stderr.read().strip()[:500]
            raise SystemExit(f"perf record failed (exit {perf.returncode}): {err}")
        steps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            step()
            steps += 1
        elapsed = time.perf_counter() - start
    finally:
        if perf.poll() is None:
            perf.send_signal(signal.SIGINT)
        try:
            _, err = perf.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            perf.kill()
            _, err = perf.communicate()
    if perf.returncode not in (0, -signal.SIGINT) or not data.exists():
        raise SystemExit(f"perf record failed (exit {perf.returncode}): {err.strip()[:500]}")
    return steps, elapsed


def read_samples(data: Path) -> list[Sample]:
    """The samples of a ``perf record`` file, through ``perf script``; a ``SystemExit`` that
    says why where perf fails, or where none of its lines is a sample this script reads."""
    out = subprocess.run([perf_binary(), "script", "-i", str(data), "-F", "tid,time,ip,sym,dso"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"perf script failed (exit {out.returncode}): {out.stderr.strip()[:500]}")
    samples, skipped = parse_samples(out.stdout.splitlines())
    if not samples:
        raise SystemExit(f"perf script gave no sample in the form 'TID TIME: IP SYMBOL (LIBRARY)' "
                         f"({skipped} other lines; first: {out.stdout.strip().splitlines()[:1]})")
    return samples


def short_symbol(symbol: str) -> str:
    """A C++ symbol without the wrapping that PyTorch's loops put around every elementwise kernel."""
    return (symbol.replace("c10::function_ref<void (char**, long const*, long, long)>::callback_fn<", "")
            .replace("at::native::", ""))


def print_counter(title: str, counter: collections.Counter, top: int) -> None:
    """``title``, then the ``top`` most common keys with their shares and counts."""
    total = sum(counter.values())
    print(f"\n{title} ({total} samples)")
    for key, n in counter.most_common(top):
        label = f"{key[0]}  {short_symbol(key[1])}" if isinstance(key, tuple) else key
        print(f"  {100 * n / max(total, 1):5.1f}%  {n:7d}  {label[:160]}")


def report(samples: list[Sample], top: int, frequency: int, main_tid: int) -> dict:
    """Print the tables; return the figures (per-thread shares of each kind, waits).
    ``main_tid``: the process's main thread (its id is the process id), named as such."""
    kinds = shares(samples, lambda s: s.kind)
    threads = {tid: sum(c.values()) for tid, c in kinds.items() if tid != "all"}

    def name(tid: str) -> str:
        return f"{tid} (main)" if tid == str(main_tid) else tid

    tids = sorted(threads, key=int)
    print("samples per thread: " + ", ".join(f"{name(tid)} {threads[tid]}" for tid in tids))
    for tid in [*tids, "all"]:
        print_counter(f"by kind, thread {name(tid)}", kinds[tid], top)
    print_counter("top symbols, all threads",
                  collections.Counter((s.kind, s.symbol) for s in samples), top)
    waiting = while_waiting(samples, 0.5 / frequency)
    print_counter("what the other threads run while a thread waits in OpenMP's runtime", waiting, top)
    return {"main_thread": str(main_tid), "samples": threads,
            "kinds": {tid: fractions(c) for tid, c in kinds.items()},
            "while_waiting": fractions(collections.Counter(kind for kind, _ in waiting.elements()))}


def fractions(counter: collections.Counter) -> dict:
    """Counts → shares of their total."""
    total = max(sum(counter.values()), 1)
    return {k: n / total for k, n in counter.items()}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    perf_binary()  # before any compile: say at once if perf is missing
    torch.set_num_threads(args.threads)
    # before the step's first buffers, as the trainer does
    taken = keep_freed_memory("--keep-freed-memory", args.keep_freed_memory)
    variant = build_variant(args, torch.device("cpu"))
    step = getattr(variant, f"{args.phase}_step")
    for _ in range(args.warmup):
        step()
    print(f"{variant.name}, {args.phase}, preset {'smoke' if args.smoke else args.preset}, "
          f"batch {args.batch}, threads {torch.get_num_threads()}, torch {torch.__version__}"
          + kept_note(taken, ", "))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "perf.data"
        steps, elapsed = record(step, args.seconds, args.frequency, data)
        samples = read_samples(data)
    print(f"{steps} steps in {elapsed:.2f} s under perf: {1e3 * elapsed / max(steps, 1):.1f} ms a step")
    figures = report(samples, args.top, args.frequency, main_tid=os.getpid())
    figures.update(steps=steps, seconds=elapsed, variant=variant.name, phase=args.phase,
                   keep_freed_memory=taken)  # mmap threshold taken, or 0
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
