"""Where the library model's time goes: torch.profiler on one training step and one sampling batch.

    python benchmarks/profile_step.py --preset mnist-captions [--precision bf16] [--compile] [--top 25]
        [--keep-freed-memory]

Prints, for each phase, the top ops by self CPU time and how many ops ran: all recorded aten
ops, and the leaf ones (ops that call no other op — on CPU each is one kernel; on CUDA the
device kernel launches are counted too), in total and per drawing step. The step is the
trainer's (zero_grad, forward, backward, per-tensor clip, PaperRMSprop), on random inputs,
after untimed warm-up steps (with ``--compile``, the warm-up compiles: the training step
at its first call, the update (clip and step) at its second; the compiled
kernels are then profiled one by one through inductor's ``cpp.enable_kernel_profile``).
Optionally writes Chrome traces (--trace-dir). ``--keep-freed-memory`` keeps the process's freed
memory as the trainer does on the CPU; without it, the profile includes the page faults of
buffers that come from fresh pages.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aligndraw.config import ModelConfig, preset  # noqa: E402
from aligndraw.model import AlignDraw  # noqa: E402
from benchmarks.machine import keep_freed_memory, kept_note  # noqa: E402
from benchmarks.throughput import PRESETS, SMOKE_CONFIG, Variant, random_inputs  # noqa: E402


def add_step_args(p: argparse.ArgumentParser) -> None:
    """The options that say which step to run: model, batch, precision, compiled or naive,
    table rows, freed memory kept or not (shared with ``native_profile.py``)."""
    p.add_argument("--preset", choices=PRESETS, default="mnist-captions", help="model configuration")
    p.add_argument("--batch", type=int, default=100, help="images per batch")
    p.add_argument("--caption-len", type=int, default=12, help="words per random caption")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--top", type=int, default=25, help="rows of each ranked table")
    p.add_argument("--naive", action="store_true", help="the naive reference instead of the library")
    p.add_argument("--compile", action="store_true", help="the library under torch.compile")
    p.add_argument("--smoke", action="store_true",
                   help="tiny config, batch 8, captions of 6 words, 10 rows a table (for CI)")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="keep the process's freed memory for reuse, as the trainer does on the CPU "
                        "(aligndraw.allocator), so that the step's buffers do not come from fresh pages "
                        "(the C library's memory: CPU only)")


def check_step_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``add_step_args``' checks (``p.error`` names what is wrong), then ``--smoke``'s sizes."""
    if args.compile and args.naive:
        p.error("--compile profiles the library model; drop --naive")
    for name in ("batch", "caption_len", "top"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.smoke:
        args.batch, args.caption_len, args.top = 8, 6, 10


def build_variant(args: argparse.Namespace, device: torch.device) -> Variant:
    """The step ``add_step_args`` describes: the library (maybe compiled) or the naive
    reference, with its optimiser, on random inputs of ``args.batch`` images."""
    cfg = ModelConfig(**SMOKE_CONFIG) if args.smoke else preset(args.preset).model
    torch.manual_seed(0)
    if args.naive:
        from benchmarks.naive_reference import NaiveAlignDraw, load_from_library

        model, name = load_from_library(NaiveAlignDraw(cfg), AlignDraw(cfg)).to(device), "naive"
    else:
        model, name = AlignDraw(cfg).to(device), "library_compiled" if args.compile else "library"
    inputs = random_inputs(cfg, args.batch, args.caption_len, device, seed=0)
    return Variant(f"{name}_{args.precision}", model, args.precision, inputs, seed=0, compiled=args.compile)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_step_args(p)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--shapes", action="store_true",
                   help="also a table of the products (mm, addmm, bmm, baddbmm and the library's oneDNN "
                        "and OpenBLAS ops) and copies by input shape")
    p.add_argument("--trace-dir", type=Path, default=None, help="write Chrome traces here")
    args = p.parse_args(argv)
    check_step_args(p, args)
    if args.keep_freed_memory and not args.device.startswith("cpu"):
        p.error(f"--keep-freed-memory keeps the C library's freed memory, for a model on the CPU; "
                f"got --device {args.device} (a GPU's tensors come from PyTorch's own allocator)")
    return args


def op_counts(prof: profile) -> dict[str, int]:
    """All aten ops, leaf aten ops (no child op) and, on CUDA, device kernels."""
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    leaves = [e for e in events if not any(c.name.startswith("aten::") for c in e.cpu_children)]
    counts = {"aten_ops": len(events), "leaf_ops": len(leaves)}
    kernels = [e for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    if kernels:
        counts["device_kernels"] = len(kernels)
    return counts


PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
            # the library's product ops: oneDNN's (its linear, the weight gradients) and OpenBLAS's
            "mkldnn::_linear_pointwise", "aligndraw::onednn_weight_grad",
            "aligndraw_openblas::mm", "aligndraw_openblas::addmm", "aligndraw_openblas::tmm",
            "aligndraw_openblas::bmm", "aligndraw_openblas::baddbmm")
SHAPED = PRODUCTS + ("aten::copy_",)  # copies too: a layout change shows up as one


def product_shapes(prof: profile, device: torch.device) -> list[dict]:
    """The products' and copies' time by op and input shapes, largest first: name, shapes, calls, ms."""
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    rows = [{"name": e.key, "shapes": str(e.input_shapes), "calls": e.count,
             "ms": getattr(e, attr) / 1e3}
            for e in prof.key_averages(group_by_input_shape=True) if e.key in SHAPED]
    return sorted(rows, key=lambda r: -r["ms"])


def print_product_shapes(prof: profile, device: torch.device) -> None:
    rows = product_shapes(prof, device)
    total = sum(r["ms"] for r in rows)
    print(f"products and copies by input shape ({total:.1f} ms in all):")
    for r in rows:
        print(f"  {r['ms']:8.2f} ms  {r['calls']:5d} calls  {r['ms'] * 1e3 / r['calls']:8.1f} µs each  "
              f"{r['name']:14s} {r['shapes']}")


def profile_phase(variant: Variant, phase: str, device: torch.device, args) -> None:
    step = getattr(variant, f"{phase}_step")
    for _ in range(2 if phase == "train" else 1):  # warm-up: allocator, optimiser state, one-time
        step()  # dispatch costs, compiles (the compiled update at the second training step)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=args.shapes) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    steps = variant.model.config.steps
    counts = op_counts(prof)
    total_ms = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3
    print(f"\n=== {phase}: {variant.name}, batch {args.batch}, T={steps} — "
          f"{total_ms:.0f} ms self CPU in total ===")
    print("op counts: " + ", ".join(f"{k} {v} ({v / steps:.0f} per drawing step)" for k, v in counts.items()))
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.top, max_name_column_width=40))
    if args.shapes:
        print_product_shapes(prof, device)
    if args.trace_dir is not None:
        args.trace_dir.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(args.trace_dir / f"{variant.name}_{phase}.json"))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.compile:
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True  # each compiled kernel is a profiler row
    # before the step's first buffers, as the trainer does
    kept = keep_freed_memory("--keep-freed-memory", args.keep_freed_memory)
    variant = build_variant(args, device)
    print(f"preset {'smoke' if args.smoke else args.preset}, threads {torch.get_num_threads()}, "
          f"device {device}, torch {torch.__version__}" + kept_note(kept, ", "))
    for phase in ("train", "sample"):
        profile_phase(variant, phase, device, args)


if __name__ == "__main__":
    main()
