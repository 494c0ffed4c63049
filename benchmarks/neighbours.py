"""Does a training step slow down when other models share its process?

    python benchmarks/neighbours.py [--preset mnist-captions] [--compile] [--rounds 7] [--passes 2]

``throughput.py`` alternates the naive reference, the eager library and the compiled library
in ONE process. If one model's step left the process (its heap, its caches) in a state that
slowed the next model's step, the ratios would be biased. This times the library's training
step (compiled with ``--compile``, else eager) in one process, under four settings:

- ``alone``: one library step after another;
- ``after_naive``: each library step right after a naive reference step;
- ``after_eager``: right after an eager library step (of a second model);
- ``after_both``: right after an eager step and a naive step, ``throughput.py``'s order.

All settings run ``--passes`` times in turn, so drift shows as spread between passes. Prints
the median and minimum ms of each setting and pass, the minor page faults a step and how many
cores other processes kept busy (a BUSY warning above ``BUSY_CORES``); one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aligndraw.model import AlignDraw  # noqa: E402
from benchmarks.machine import BUSY_CORES, OtherLoad, timed  # noqa: E402
from benchmarks.naive_reference import NaiveAlignDraw, load_from_library  # noqa: E402
from benchmarks.throughput import PRESETS, Variant, log, model_config, random_inputs  # noqa: E402

CPU = torch.device("cpu")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="mnist-captions", choices=PRESETS)
    p.add_argument("--compile", action="store_true", help="time the compiled library (else eager)")
    p.add_argument("--rounds", type=int, default=7, help="timed library steps per setting and pass")
    p.add_argument("--passes", type=int, default=2, help="times every setting is run, in turn")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="tiny config, batch 8 (for CI)")
    args = p.parse_args(argv)
    if min(args.rounds, args.passes, args.threads) < 1:
        p.error("--rounds, --passes and --threads must be ≥ 1")
    return args


def timed_step(variant: Variant) -> tuple[float, int]:
    """(wall seconds, minor page faults of this process) of one training step."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    wall = timed(variant.train_step, CPU)
    return wall, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def run_setting(subject: Variant, before: list[Variant], rounds: int) -> dict[str, float]:
    """``rounds`` library steps, each after one step of every variant in ``before``."""
    walls, faults = [], []
    for _ in range(rounds):
        for other in before:
            other.train_step()
        wall, fault = timed_step(subject)
        walls.append(wall)
        faults.append(fault)
    return {"median_ms": 1e3 * statistics.median(walls), "min_ms": 1e3 * min(walls),
            "faults_per_step": statistics.median(faults)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = model_config(args)
    inputs = random_inputs(cfg, 8 if args.smoke else 100, 6 if args.smoke else 12, CPU, 0)
    torch.manual_seed(0)
    reference = AlignDraw(cfg)

    def library() -> AlignDraw:
        model = AlignDraw(cfg)
        model.load_state_dict(reference.state_dict())
        return model

    subject = Variant("subject", library(), "fp32", inputs, 0, compiled=args.compile)
    naive = Variant("naive", load_from_library(NaiveAlignDraw(cfg), reference), "fp32", inputs, 0)
    eager = Variant("eager", library(), "fp32", inputs, 0)
    log(f"first library step {timed(subject.train_step, CPU):.1f}s")  # compiles with --compile
    for variant in (naive, eager, subject):  # warm-up
        variant.train_step()
    before = {"alone": [], "after_naive": [naive], "after_eager": [eager], "after_both": [eager, naive]}
    result: dict = {"preset": "smoke" if args.smoke else args.preset, "compiled": args.compile,
                    "threads": args.threads, "rounds": args.rounds}
    with OtherLoad() as load:
        for p in range(args.passes):
            for setting, others in before.items():
                figures = run_setting(subject, others, args.rounds)
                print(f"pass {p + 1} {setting:12s} median {figures['median_ms']:8.1f} ms  "
                      f"min {figures['min_ms']:8.1f} ms  page faults a step {figures['faults_per_step']:.0f}",
                      flush=True)
                result[f"pass{p + 1}_{setting}"] = figures
    result["other_processes_cores"] = load.cores
    result["busy"] = load.cores is not None and load.cores > BUSY_CORES
    if result["busy"]:
        print(f"BUSY: other processes kept {load.cores:.2f} cores busy; the figures say little")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
