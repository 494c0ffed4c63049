"""Training and sampling throughput of ``AlignDraw`` against the naive per-step reference.

    python benchmarks/throughput.py --preset mnist-captions [--precision both] [--compile]
                                    [--processes 2] [--products]

Both models get the preset's ``ModelConfig``, the same weights and the same batch of random
inputs (no data loading is timed). A training step is what the trainer does: zero_grad,
forward, backward, per-tensor gradient clipping at 10, ``PaperRMSprop`` step. A sampling batch
is ``model.sample`` under no_grad. Timed runs of every variant (library / naive, fp32 / bf16,
compiled, data-parallel) alternate round-robin within ONE run (every other round in reverse
order), so the ratios hold on a noisy machine (with ``--processes N`` a variant's N workers
run one step each while the rest wait); medians and min/max are reported. Achieved GFLOP/s
use the analytic FLOP counts of ``benchmarks/flops.py`` and are given as a share of the
machine's measured matmul peak.

Output: a readable table, then ONE JSON line with every figure (last line of stdout).
Progress messages go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aligndraw import allocator, compiler, gemm, openblas  # noqa: E402
from aligndraw.config import ModelConfig, preset  # noqa: E402
from aligndraw.model import AlignDraw  # noqa: E402
from aligndraw.trainer import PaperRMSprop, Update, average_gradients  # noqa: E402
from benchmarks.data_parallel import DataParallelVariant, WorkerSpec  # noqa: E402
from benchmarks.flops import flops_per_image  # noqa: E402
from benchmarks.machine import (  # noqa: E402
    BUSY_CORES,
    OtherLoad,
    keep_freed_memory,
    kept_note,
    kernel_environment,
    matmul_peak,
    timed,
    timed_cpu,
)
from benchmarks.naive_reference import (  # noqa: E402
    NaiveAlignDraw,
    load_from_library,
    parameter_map,
    perturb_parameters_,
)
from benchmarks.pairs import balanced, median_interval  # noqa: E402
from benchmarks.products import ProductsOnly  # noqa: E402

PRESETS = ("mnist-captions", "coco32")
CLIP_NORM = 10.0
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
# A tiny configuration for --smoke (the unit tests' size: hidden 16, T=3, 12×12 images).
SMOKE_CONFIG = dict(vocab_size=23, channels=1, height=12, width=12, steps=3, read_n=3, write_n=3,
                    embed_dim=8, lang_hidden=8, align_dim=8, enc_hidden=16, dec_hidden=16, z_dim=4)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="mnist-captions", help="model configuration")
    p.add_argument("--batch", type=int, default=100, help="images per batch (the paper's 100)")
    p.add_argument("--caption-len", type=int, default=12, help="words per random caption")
    p.add_argument("--repeats", type=int, default=7,
                   help="timed runs per variant (an odd number gets one more: as many rounds in each order)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per variant first")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--precision", choices=("fp32", "bf16", "both"), default="fp32",
                   help="bf16 = torch.autocast(bfloat16) around forward / sample, for both models")
    p.add_argument("--compile", action="store_true",
                   help="also time a torch.compile'd library model and report its compile time")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="torch.compile's mode for --compile (reduce-overhead: CUDA graphs, on a GPU)")
    p.add_argument("--skip-naive", action="store_true", help="time the library model only")
    p.add_argument("--gemm-baseline", action="store_true",
                   help="also time the eager fp32 library with the other CPU product backend "
                        "than aligndraw.gemm's default (variant library_aten_fp32 where the "
                        "default is oneDNN or OpenBLAS, library_onednn_fp32 where it is aten: "
                        "Intel, and CPUs without AVX-512 other than AMD's)")
    p.add_argument("--compile-baseline", action="store_true",
                   help="with --compile, also time the fp32 library under plain torch.compile "
                        "(variant library_plaincompiled_fp32), without aligndraw.compiler's graph pass")
    p.add_argument("--products", action="store_true",
                   help="also time the plain matrix products of a step alone, back to back "
                        "(variant products_fp32, benchmarks/products.py): an estimate of the "
                        "floor of an implementation that runs them in these shapes through "
                        "this product library")
    p.add_argument("--processes", type=int, default=1,
                   help="N > 1: also time library and naive models data-parallel in N worker "
                        "processes × 1 thread, each on batch/N images (as `torchrun "
                        "--nproc-per-node N aligndraw train --num-threads 1`)")
    p.add_argument("--flush-denormal", action="store_true",
                   help="treat subnormal numbers as 0 in this process and its workers, for both "
                        "models (torch.set_flush_denormal: the x86 FTZ and DAZ modes), set "
                        "before any thread starts")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="keep freed memory for reuse in this process and its workers, for both "
                        "models, as the trainer does on the CPU (aligndraw.allocator: glibc's "
                        "mmap and trim thresholds raised), set before any model is built")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--peak-size", type=int, default=2048, help="side of the square peak matmul")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny config, batch 8, 1 repeat (for CI)")
    args = p.parse_args(argv)
    if args.smoke:  # one thread: a CI machine's other jobs must not stall an OpenMP barrier
        args.batch, args.repeats, args.warmup, args.peak_size = 8, 1, 1, 256
        args.threads = args.threads or 1
        args.caption_len = min(args.caption_len, 6)
    for name in ("batch", "repeats", "caption_len", "peak_size", "processes"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be ≥ 1")
    args.repeats = even_rounds(args.repeats)  # as round_robin times them (recorded so)
    if args.compile_mode != "default" and not args.compile:
        p.error(f"--compile-mode {args.compile_mode} applies to --compile; add --compile")
    if args.compile_mode == "reduce-overhead" and args.device == "cpu":
        p.error("--compile-mode reduce-overhead captures CUDA graphs; it needs --device cuda")
    if args.compile_baseline and not args.compile:
        p.error("--compile-baseline times plain torch.compile beside --compile; add --compile")
    if args.processes > 1 and (args.batch % args.processes or args.device != "cpu"):
        p.error(f"--processes {args.processes} needs the CPU and a batch it divides "
                f"(--batch {args.batch})")
    return args


def model_config(args: argparse.Namespace) -> ModelConfig:
    if args.smoke:
        return ModelConfig(**SMOKE_CONFIG)
    return preset(args.preset).model


def random_inputs(cfg: ModelConfig, batch: int, caption_len: int, device: torch.device, seed: int):
    """Images in [0, 1] (B, C, H, W), full-length random captions (B, L), lengths (B,)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, cfg.channels, cfg.height, cfg.width, generator=g)
    tokens = torch.randint(1, cfg.vocab_size, (batch, caption_len), generator=g)
    lengths = torch.full((batch,), caption_len, dtype=torch.long)
    return images.to(device), tokens.to(device), lengths.to(device)


def autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


# --------------------------------------------------------------------------- the timed work
class Variant:
    """One model (library or naive, maybe compiled) at one precision, with its own optimiser."""

    # What a data-parallel variant (benchmarks/data_parallel.py) also reports: its workers'
    # process ids and CPU seconds of the last step. A variant in this process has none.
    pids: tuple[int, ...] = ()
    worker_cpu_s = 0.0

    def __init__(self, name: str, model: torch.nn.Module, precision: str, inputs, seed: int,
                 compiled: bool = False, world_size: int = 1, gemm_backend: str | None = None,
                 stack_products: bool = True, compile_mode: str = "default") -> None:
        self.name, self.model, self.precision = name, model, precision
        self.gemm_backend = gemm_backend  # None: the process's (aligndraw.gemm's default)
        self.images, self.tokens, self.lengths = inputs
        self.optimizer = PaperRMSprop(model.parameters(), lr=1e-3)
        # the trainer's update: clip, step; under torch.compile with the compiled model
        self.update = Update(self.optimizer, CLIP_NORM, compiled=compiled)
        self.noise = torch.Generator(device=self.images.device).manual_seed(seed)
        cfg = model.config
        self.noise_shape = (self.images.shape[0], cfg.steps, cfg.z_dim)
        # ``world_size`` > 1: one replica in a process group (benchmarks/data_parallel.py);
        # its gradients are averaged over the processes after backward, as the trainer does.
        self.world_size = world_size
        # The compiled variant compiles forward (through the module) and sample separately,
        # as the library does (aligndraw.compiler: its graph pass stacks the per-step weight
        # gradients) or, with ``stack_products=False``, with plain torch.compile.
        # ``compile_mode``: torch.compile's mode ("reduce-overhead": CUDA graphs on a GPU).
        compile_fn = compiler.compile if stack_products else torch.compile
        self.forward = compile_fn(model, mode=compile_mode) if compiled else model
        self.sampler = compile_fn(model.sample, mode=compile_mode) if compiled else model.sample

    def _eps(self) -> torch.Tensor:
        # ε is drawn outside the model call (identically for every variant) so that compiled
        # graphs need not capture a torch.Generator.
        return torch.randn(self.noise_shape, generator=self.noise, device=self.images.device)

    def _gemm(self):
        return gemm.using(self.gemm_backend) if self.gemm_backend else nullcontext()

    def train_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with self._gemm():
            with autocast(self.precision, self.images.device):
                out = self.forward(self.images, self.tokens, self.lengths, noise=self._eps())
            out.loss.backward()
        if self.world_size > 1:
            average_gradients(self.model.parameters(), self.world_size)
        self.update()

    def sample_step(self) -> None:
        with torch.no_grad(), autocast(self.precision, self.images.device), self._gemm():
            # Images only, for every variant (the per-step canvases are for pictures).
            self.sampler(self.tokens, self.lengths, noise=self._eps(), history=False)


def _timed_variant(variant, phase: str, device: torch.device) -> tuple[float, float]:
    """(wall, CPU) seconds of one step; a data-parallel variant's CPU time is its workers'."""
    wall, cpu = timed_cpu(getattr(variant, f"{phase}_step"), device)
    return wall, cpu + variant.worker_cpu_s


def reversed_round(timed_index: int) -> bool:
    """Whether ``round_robin`` runs the round with this index among the timed ones (warm-up
    rounds count back from -1) in reverse order: every other one, the first timed one not."""
    return timed_index % 2 == 1


def even_rounds(repeats: int) -> int:
    """``repeats`` timed rounds made even (one more if odd): as many in each order."""
    return repeats + repeats % 2


def round_robin(variants: list[Variant], phase: str, warmup: int, repeats: int,
                device: torch.device) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Alternate the variants run by run; returns wall and CPU seconds per variant (no warm-up).

    The timed rounds run them in ``variants``' order, then reversed, and so on (the warm-up
    rounds before them alternate too, ending reversed), and come in an even number
    (``even_rounds``): each variant is then first of a round as often as last, and a round's
    first run follows the same variant's run of the round before. Running first or second can
    cost time of its own (``pairs.balanced``, which takes the rounds two by two, one in each
    order); with one more round in one order, that cost went into the medians. The log lists
    every round in ``variants``' order.
    CPU seconds cover all threads of this process, spin-waits at OpenMP barriers included: at
    one thread they are the work done; with several on a busy machine they grow with wall time.
    """
    walls: dict[str, list[float]] = {v.name: [] for v in variants}
    cpus: dict[str, list[float]] = {v.name: [] for v in variants}
    repeats = even_rounds(repeats) if len(variants) > 1 else repeats
    for r in range(warmup + repeats):
        # the last warm-up round reversed, so the first timed one's first run follows its own
        reverse = reversed_round(r - warmup) and len(variants) > 1
        order = variants[::-1] if reverse else variants
        ran = {v.name: _timed_variant(v, phase, device) for v in order}
        this_round = {v.name: ran[v.name] for v in variants}
        if r >= warmup:
            for name, (wall, cpu) in this_round.items():
                walls[name].append(wall)
                cpus[name].append(cpu)
        log(f"  {phase} round {r + 1}/{warmup + repeats}{' (warm-up)' if r < warmup else ''}"
            f"{', reversed' if reverse else ''}: "
            + ", ".join(f"{name} {wall:.3f}s (cpu {cpu:.3f}s)" for name, (wall, cpu) in this_round.items()))
    return walls, cpus


def summarise(times: list[float], cpu_times: list[float], batch: int, flops: float, peak: float,
              threads: int) -> dict[str, float]:
    """Wall-time statistics, images/s, achieved GFLOP/s and share of the matmul peak.

    ``cpu_median_s`` is the median CPU time of the process per run; ``cpu_utilisation`` =
    CPU / (wall × threads), near 1 on an idle machine (spinning threads count as busy).
    """
    median = statistics.median(times)
    ips = batch / median
    gflops = flops * ips / 1e9
    cpu = statistics.median(cpu_times)
    return {"median_s": median, "min_s": min(times), "max_s": max(times), "images_per_s": ips,
            "images_per_s_min": batch / max(times), "images_per_s_max": batch / min(times),
            "gflops": gflops, "share_of_peak": gflops / peak, "cpu_median_s": cpu,
            "cpu_utilisation": cpu / (median * threads), "runs": len(times)}


def equality_check(reference: AlignDraw, inputs, seed: int, compiled: bool = False,
                   data_parallel: tuple[DataParallelVariant, ...] = (),
                   compile_mode: str = "default") -> dict[str, float]:
    """fp32, same weights and noise: loss, kl_steps and gradient differences, and sample images.

    The weights are a perturbed copy of ``reference`` (see ``perturb_parameters_``): at the tiny
    init some gradients are pure rounding noise and would make the comparison meaningless.
    ``compiled``: the library model under torch.compile is compared too (keys ``compiled_*``),
    in ``compile_mode``: the timed variant's, whose graphs inductor's cache then serves.
    ``data_parallel``: library variants whose workers each take their share of the batch and
    average gradients (keys ``dp2_*``, ``dp2_compiled_*``: the name between library_ and _fp32).
    """
    images, tokens, lengths = inputs
    cfg = reference.config
    lib = AlignDraw(cfg).to(images.device)
    lib.load_state_dict(reference.state_dict())
    perturb_parameters_(lib, torch.Generator().manual_seed(seed))
    naive = load_from_library(NaiveAlignDraw(cfg).to(images.device), lib)
    noise = torch.randn((images.shape[0], cfg.steps, cfg.z_dim),
                        generator=torch.Generator().manual_seed(seed)).to(images.device)
    outs, grads = [], []
    for model in (lib, naive):
        model.zero_grad(set_to_none=True)
        out = model(images, tokens, lengths, noise=noise)
        out.loss.backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        model.zero_grad(set_to_none=True)
    lib_params = dict(lib.named_parameters())
    s_lib = lib.sample(tokens, lengths, noise=noise).images
    s_naive = naive.sample(tokens, lengths, noise=noise).images
    result = _differences(outs[0], grads[0], s_lib, outs[1], grads[1], s_naive, naive, lib_params)
    if compiled:  # the same weights through the compiler: forward, backward and sampling
        out, grad, sample = _compiled_outputs(lib, inputs, noise, compile_mode)
        diffs = _differences(out, grad, sample, outs[1], grads[1], s_naive, naive, lib_params)
        result |= {f"compiled_{k}": v for k, v in diffs.items() if k != "loss_naive"}
    for variant in data_parallel:
        got = variant.check(lib.state_dict(), noise)
        diffs = _differences(got, got.grads, got.sample, outs[1], grads[1], s_naive, naive, lib_params)
        result |= {f"{_arrangement(variant.name)}_{k}": v for k, v in diffs.items() if k != "loss_naive"}
    return result


def _compiled_outputs(lib: AlignDraw, inputs, noise: torch.Tensor, compile_mode: str):
    """Loss terms, gradients and samples of ``lib`` compiled in ``compile_mode``, as copies.

    Under CUDA graphs ("reduce-overhead") a compiled function's first calls only warm up and
    record, and a later replay overwrites its outputs, so each runs three times there and its
    outputs are copied before the next compiled call."""
    images, tokens, lengths = inputs
    calls = 3 if compile_mode == "reduce-overhead" else 1
    forward = compiler.compile(lib, mode=compile_mode)
    for _ in range(calls):
        lib.zero_grad(set_to_none=True)
        out = forward(images, tokens, lengths, noise=noise)
        out.loss.backward()
        out = SimpleNamespace(loss=out.loss.detach().clone(), kl_steps=out.kl_steps.detach().clone())
    grad = {n: p.grad.clone() for n, p in lib.named_parameters() if p.grad is not None}
    sampler = compiler.compile(lib.sample, mode=compile_mode)
    for _ in range(calls):
        sample = sampler(tokens, lengths, noise=noise, history=False).images.clone()
    return out, grad, sample


def _arrangement(name: str) -> str:
    """"dp2_compiled" for library_dp2_compiled_fp32, "" for library_fp32."""
    return name.removeprefix("library").rsplit("_", 1)[0].strip("_")


def _differences(out, grads, sample, ref_out, ref_grads, ref_sample, naive, lib_params) -> dict:
    """Loss, KL-per-step, gradient and sample differences of the library from the naive model."""
    rel = [float((grads[lib_name] - ref_grads[name]).norm() / (ref_grads[name].norm() + 1e-30))
           for name, lib_name in parameter_map(naive).items()
           if name in ref_grads and lib_name in lib_params and ref_grads[name].norm() > 0]
    loss, ref_loss = float(out.loss.detach()), float(ref_out.loss.detach())
    result = {
        "loss_library": loss, "loss_naive": ref_loss, "loss_rel_diff": abs(loss - ref_loss) / abs(ref_loss),
        "kl_steps_max_abs_diff": float((out.kl_steps - ref_out.kl_steps).detach().abs().max()),
        "grad_max_rel_diff": max(rel), "sample_max_abs_diff": float((sample - ref_sample).abs().max()),
    }
    result["equal"] = bool(result["loss_rel_diff"] < 1e-4 and result["grad_max_rel_diff"] < 1e-3
                           and result["sample_max_abs_diff"] < 1e-4)
    return result


# --------------------------------------------------------------------------- assembling a run
def build_variants(args, cfg: ModelConfig, inputs, device: torch.device, precisions: list[str]):
    """Library (and naive, and compiled) variants with identical starting weights."""
    torch.manual_seed(args.seed)
    reference = AlignDraw(cfg).to(device)
    variants, compile_s = [], {}
    for precision in precisions:
        lib = AlignDraw(cfg).to(device)
        lib.load_state_dict(reference.state_dict())
        variants.append(Variant(f"library_{precision}", lib, precision, inputs, args.seed))
        other = "aten" if gemm.backend() != "aten" else "onednn"
        if (args.gemm_baseline and precision == "fp32" and device.type == "cpu"
                and (other == "aten" or torch.backends.mkldnn.is_available())):
            lib = AlignDraw(cfg).to(device)
            lib.load_state_dict(reference.state_dict())
            variants.append(Variant(f"library_{other}_{precision}", lib, precision, inputs, args.seed,
                                    gemm_backend=other))
        if not args.skip_naive:
            naive = load_from_library(NaiveAlignDraw(cfg).to(device), reference)
            variants.append(Variant(f"naive_{precision}", naive, precision, inputs, args.seed))
        if args.compile:
            compiled = AlignDraw(cfg).to(device)
            compiled.load_state_dict(reference.state_dict())
            variant = Variant(f"library_compiled_{precision}", compiled, precision, inputs, args.seed,
                              compiled=True, compile_mode=args.compile_mode)
            compiled_variants = [variant]
            if args.compile_baseline and precision == "fp32":
                plain = AlignDraw(cfg).to(device)
                plain.load_state_dict(reference.state_dict())
                compiled_variants.append(Variant(f"library_plaincompiled_{precision}", plain, precision,
                                                 inputs, args.seed, compiled=True, stack_products=False,
                                                 compile_mode=args.compile_mode))
            for variant in compiled_variants:
                try:
                    compile_s[variant.name] = compile_variant(variant, device)
                    variants.append(variant)
                except Exception as exc:  # report the failure, keep benchmarking the rest
                    compile_s[variant.name] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
                    log(f"torch.compile failed for {variant.name}: {exc}")
        if args.processes > 1:
            variants += data_parallel_variants(args, cfg, reference, inputs, precision, compile_s)
    if args.products:
        variants.append(ProductsOnly(cfg, args.batch, args.caption_len, device, args.seed))
    return reference, variants, compile_s


def variant_flops(variant, flops: dict, phase: str) -> float:
    """The product FLOPs per image a variant runs: the model's, or the products-only share."""
    return flops[phase] * (variant.share_of_flops[phase] if isinstance(variant, ProductsOnly) else 1.0)


def products_floor(results: dict, products: ProductsOnly) -> dict:
    """Per phase, the products' milliseconds, the naive reference's over them (about the most an
    implementation running them through this product library reaches), and what each library
    variant spends beside them (its milliseconds minus theirs)."""
    out = {}
    for phase in ("train", "sample"):
        floor = results[products.name][phase]["median_s"]
        naive = results.get("naive_fp32", {}).get(phase, {}).get("median_s")
        out[phase] = {"products_ms": floor * 1e3, "x_naive": naive / floor if naive else None,
                      "share_of_flops": products.share_of_flops[phase],
                      "beside_products_ms": {name: (r[phase]["median_s"] - floor) * 1e3
                                             for name, r in results.items()
                                             if name.startswith("library") and name.endswith("_fp32")}}
        if naive:  # 3× the naive reference, in ms, less the products: what all else may take
            out[phase]["ms_left_for_3x"] = (naive / 3 - floor) * 1e3
    return out


def floor_line(phase: str, f: dict, backend: str) -> str:
    """One phase of ``products_floor`` as a line of the report."""
    line = (f"products alone ({phase}, {100 * f['share_of_flops']:.0f} % of the FLOPs, not batched, "
            f"through {backend}): {f['products_ms']:.1f} ms")
    if f["x_naive"]:
        left = f["ms_left_for_3x"]
        line += f" = {f['x_naive']:.2f}× naive; " + (
            f"3× leaves {left:.0f} ms for all else" if left >= 0
            else f"3× is out of reach: they alone take {-left:.0f} ms more than 3× allows")
    beside = ", ".join(f"{name} {ms:.0f} ms" for name, ms in f["beside_products_ms"].items())
    return line + f"; beside them: {beside}"


def data_parallel_variants(args, cfg: ModelConfig, reference: AlignDraw, inputs, precision: str,
                           compile_s: dict) -> list[DataParallelVariant]:
    """Library (eager and, with --compile, compiled) and naive models in ``--processes`` worker
    processes of one thread each, every one on its share of the batch."""
    n = args.processes
    kinds = [("library", False)] + [("library", True)] * args.compile
    kinds += [("naive", False)] * (not args.skip_naive)
    out = []
    for kind, compiled in kinds:
        name = f"{kind}_dp{n}{'_compiled' if compiled else ''}_{precision}"
        log(f"starting {n} worker processes for {name} …")
        spec = WorkerSpec(kind, cfg, reference.state_dict(), inputs, precision, args.seed, compiled,
                          args.flush_denormal, args.keep_freed_memory)
        variant = DataParallelVariant(name, spec, n)
        if compiled:
            compile_s[name] = compile_variant(variant, torch.device("cpu"))
        out.append(variant)
    return out


def compile_variant(variant: Variant, device: torch.device) -> dict[str, float]:
    """First call of each compiled phase = compile time (plus one run); graphs and breaks. The
    update (clip and step) is compiled at the second training step: timed as its own figure."""
    from torch._dynamo.utils import counters

    counters.clear()
    log(f"compiling {variant.name} (train) …")
    train_s = timed(variant.train_step, device)
    log(f"  train compiled in {train_s:.1f}s; compiling the update …")
    update_s = timed(variant.train_step, device)
    log(f"  second train step (the update compiled) in {update_s:.1f}s; compiling sample …")
    sample_s = timed(variant.sample_step, device)
    log(f"  sample compiled in {sample_s:.1f}s")
    first = {"train_first_call_s": train_s, "train_second_call_s": update_s, "sample_first_call_s": sample_s}
    if isinstance(variant, DataParallelVariant):  # the workers compile; their counters stay there
        return first
    return first | {"unique_graphs": int(counters["stats"]["unique_graphs"]),
                    "graph_breaks": int(sum(counters["graph_break"].values())),
                    "graph_break_reasons": [_short_reason(r) for r in sorted(counters["graph_break"])[:5]]}


def _short_reason(reason: str) -> str:
    """A graph-break message's first line and its debug context, on one line."""
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    context = [line for line in lines if line.startswith("Developer debug context")]
    return " | ".join(lines[:1] + context)[:300]


def ratios(results: dict, times: dict) -> dict:
    """Every variant vs the naive reference (same precision, and fp32), and a data-parallel
    library variant also vs the naive model in the same arrangement: ratio of median wall
    times, median of per-round (paired) ratios with a 95 % interval for it (``pairs``; None
    below 6 rounds), the same over blocks of two rounds in both orders (``pairs.balanced``;
    None below 2 rounds), and ratio of median CPU times."""
    out = {}
    for name in results:
        precision = name.rsplit("_", 1)[1]
        if name == f"naive_{precision}":
            continue
        bases = [f"naive_{precision}", "naive_fp32"]
        processes = _arrangement(name).split("_")[0]  # "dp2" for library_dp2_compiled_fp32
        if name.startswith("library") and processes.startswith("dp"):
            bases.append(f"naive_{processes}_{precision}")  # the naive model arranged alike
        for base in dict.fromkeys(bases):
            if base not in results:
                continue
            key = f"{name}/{base}"
            out[key] = {}
            for phase in ("train", "sample"):
                paired = [n / lib for n, lib in zip(times[phase][base], times[phase][name], strict=True)]
                out[key][phase] = results[base][phase]["median_s"] / results[name][phase]["median_s"]
                out[key][f"{phase}_paired"] = statistics.median(paired)
                out[key][f"{phase}_paired_ci95"] = median_interval(paired)
                blocks = balanced(paired)  # two rounds, one in each order, per block
                out[key][f"{phase}_balanced"] = blocks and blocks["median"]
                out[key][f"{phase}_balanced_ci95"] = blocks and blocks["ci95"]
                out[key][f"{phase}_cpu"] = (results[base][phase]["cpu_median_s"]
                                            / results[name][phase]["cpu_median_s"])
    return out


def blocks_line(key: str, ratio: dict) -> str | None:
    """The printed line of ``ratio``'s figures by blocks of both orders (``ratios``), or None
    where it has none. It names a 95 % interval only where it gives one (too few blocks give
    none)."""
    intervals = [ratio.get(f"{phase}_balanced_ci95") for phase in ("train", "sample")]
    shown = [f"{phase} {ratio[f'{phase}_balanced']:.2f}×" + (f" ({iv[0]:.2f}–{iv[1]:.2f}×)" if iv else "")
             for phase, iv in zip(("train", "sample"), intervals, strict=True)
             if ratio.get(f"{phase}_balanced")]
    if not shown:
        return None
    named = " (95 % interval)" if any(intervals) else ""
    return f"by blocks of two rounds in both orders{named}, {key}: " + ", ".join(shown)


def print_table(report: dict) -> None:
    peak, flops = report["peak_gflops"], report["flops_per_image"]
    print(f"preset {report['preset']}  batch {report['batch']}  threads {report['threads']}  "
          f"device {report['gpu'] or report['device']}  torch {report['torch']}  "
          f"load avg {report['loadavg_before']}")
    print(f"cpu {report['cpu_vendor'] or report['cpu']}  PyTorch's kernels: {report['aten_cpu_capability']}  "
          f"library's fp32 products: {report['gemm_backend']} (batched: "
          f"{report['batched_backend']})"
          + (f"  OpenBLAS's kernels: {report['openblas_core']}" if report["openblas_core"] else "")
          + ("  subnormal numbers flushed to 0 (--flush-denormal)" if report["flush_denormal"] else "")
          + kept_note(report["keep_freed_memory"], "  "))
    if report["kernel_env"]:
        print("kernels chosen by the environment: "
              + ", ".join(f"{k}={v}" for k, v in report["kernel_env"].items()))
    if report["busy"]:
        print(f"WARNING: the machine was busy: other processes used {report['other_processes_cores']:.2f} "
              f"of {report['cores']} cores on average while timing. With several threads "
              "every parallel op waits for any descheduled thread, so wall times are inflated and "
              "ratios unreliable; rerun on an idle machine or compare at --threads 1.")
    print("matmul peak: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peak.items())
          + f" ({report['peak_size']}², median)")
    print(f"matmul FLOPs per image: train {flops['train'] / 1e9:.3f} GFLOP, "
          f"sample {flops['sample'] / 1e9:.3f} GFLOP")
    check = report.get("check")
    if check:
        print(f"fp32 equality (same weights and noise): loss rel diff {check['loss_rel_diff']:.1e}, "
              f"max grad rel diff {check['grad_max_rel_diff']:.1e}, sample max abs diff "
              f"{check['sample_max_abs_diff']:.1e} → {'EQUAL' if check['equal'] else 'DIFFERENT'}")
        if "compiled_equal" in check:
            print(f"compiled fp32 vs naive: loss rel diff {check['compiled_loss_rel_diff']:.1e}, max grad "
                  f"rel diff {check['compiled_grad_max_rel_diff']:.1e}, sample max abs diff "
                  f"{check['compiled_sample_max_abs_diff']:.1e} → "
                  f"{'EQUAL' if check['compiled_equal'] else 'DIFFERENT'}")
    for name, s in report["compile_s"].items():
        if "error" in s:
            print(f"compile {name}: FAILED {s['error']}")
            continue
        graphs = (f", {s['unique_graphs']} graphs, {s['graph_breaks']} graph breaks: "
                  f"{'; '.join(s['graph_break_reasons'])}" if "unique_graphs" in s else " (in workers)")
        mode = f" (mode {report['compile_mode']})" if report["compile_mode"] != "default" else ""
        print(f"compile {name}{mode}: first train step {s['train_first_call_s']:.1f}s, second (the update) "
              f"{s['train_second_call_s']:.1f}s, first sample "
              f"{s['sample_first_call_s']:.1f}s{graphs}")
    print(f"\n{'phase':<7}{'variant':<26}{'median ms':>10}{'min..max ms':>18}{'img/s':>9}"
          f"{'img/s min..max':>17}{'GFLOP/s':>9}{'%peak':>7}{'cpu ms':>9}{'cpu use':>8}")
    for phase in ("train", "sample"):
        for name, res in report["results"].items():
            s = res[phase]
            print(f"{phase:<7}{name:<26}{s['median_s'] * 1e3:>10.1f}"
                  f"{s['min_s'] * 1e3:>9.1f}..{s['max_s'] * 1e3:<7.1f}{s['images_per_s']:>9.1f}"
                  f"{s['images_per_s_min']:>8.1f}..{s['images_per_s_max']:<7.1f}"
                  f"{s['gflops']:>9.1f}{100 * s['share_of_peak']:>6.1f}%{s['cpu_median_s'] * 1e3:>9.0f}"
                  f"{100 * s['cpu_utilisation']:>7.0f}%")
    if report["ratios"]:
        print(f"\n{'speed-up (wall medians, paired rounds, CPU time)':<52}{'train':>8}{'paired':>8}"
              f"{'cpu':>8}{'sample':>8}{'paired':>8}{'cpu':>8}")
        for key, r in report["ratios"].items():
            print(f"{key:<52}" + "".join(f"{r[k]:>7.2f}×" for k in (
                "train", "train_paired", "train_cpu", "sample", "sample_paired", "sample_cpu")))
        for key, r in report["ratios"].items():
            shown = [f"{phase} {iv[0]:.2f}–{iv[1]:.2f}×" for phase in ("train", "sample")
                     if (iv := r.get(f"{phase}_paired_ci95"))]
            if shown:
                print(f"95 % interval of the paired ratio, {key}: " + ", ".join(shown))
        for key, r in report["ratios"].items():
            if line := blocks_line(key, r):
                print(line)
    ceiling = report.get("ceiling")
    if ceiling and ceiling["train"]["x_naive"]:
        print("fp32 ceiling (matrix products alone at the measured peak): " + ", ".join(
            f"{phase} {c['images_per_s']:.0f} img/s = {c['x_naive']:.2f}× naive, 3× needs the whole "
            f"step at {100 * c['share_of_peak_for_3x']:.0f}% of peak" for phase, c in ceiling.items()))
    for phase, f in (report.get("products_floor") or {}).items():
        print(floor_line(phase, f, report["gemm_backend"]))
    if report.get("targets"):
        print(f"targets: {report['targets']}")


def matmul_peaks(size: int, device: torch.device, repeats: int, bf16: bool = True) -> dict[str, float]:
    """GFLOP/s of a square product: fp32 through PyTorch's ``@`` (``fp32_aten``) and, on a CPU,
    through ``aligndraw.gemm``'s oneDNN path (``fp32_onednn``, with oneDNN) and OpenBLAS path
    (``fp32_openblas``, where it can be built), and with ``bf16`` bf16; ``fp32`` is the fastest
    of the fp32 figures: the machine's fp32 peak, which shares of peak and the ceiling are
    measured against."""
    peak = {"fp32_aten": matmul_peak(torch.float32, size, device, repeats)}
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        peak["fp32_onednn"] = matmul_peak(torch.float32, size, device, repeats, gemm_backend="onednn")
    if device.type == "cpu" and openblas.missing() is None:
        peak["fp32_openblas"] = matmul_peak(torch.float32, size, device, repeats, gemm_backend="openblas")
    peak["fp32"] = max(peak.values())
    if bf16:
        peak["bf16"] = matmul_peak(torch.bfloat16, size, device, repeats)
    return peak


def wants_bf16_peak(precisions: list[str], device: torch.device) -> bool:
    """Whether to measure the bf16 peak: for bf16 variants, and wherever bf16 products are
    native (a CPU without bf16 kernels multiplies a 2048² bf16 product in about a minute
    through a scalar fallback: seven of them would add minutes to an fp32 run)."""
    return "bf16" in precisions or device.type != "cpu" or gemm.cpu_bf16_native()


def fp32_ceiling(results: dict, flops: dict, peak: dict) -> dict:
    """What the matmul peak allows in fp32: images/s if a step were nothing but its matrix
    products at the measured peak, that as a multiple of the naive reference, and the share of
    peak the *whole* step must average to reach the issue's 3× the naive reference."""
    out = {}
    for phase in ("train", "sample"):
        ceiling = peak["fp32"] * 1e9 / flops[phase]
        naive = results.get("naive_fp32", {}).get(phase, {}).get("images_per_s")
        out[phase] = {"images_per_s": ceiling,
                      "x_naive": ceiling / naive if naive else None,
                      "share_of_peak_for_3x": 3.0 * naive / ceiling if naive else None}
    return out


def fp32_targets(all_ratios: dict, check: dict) -> dict:
    """The issue's targets per fp32 variant: ≥ 3× the naive fp32 reference, results equal."""
    targets = {}
    names = dict.fromkeys(key.split("/")[0] for key in all_ratios)
    for variant in (n for n in names if n.startswith("library") and n.endswith("_fp32")):
        key = f"{_arrangement(variant)}_equal".lstrip("_")
        r = all_ratios.get(f"{variant}/naive_fp32")
        if r and key in check:
            targets[variant] = {"train_3x": r["train"] >= 3.0, "sample_3x": r["sample"] >= 3.0,
                                "fp32_equal": check[key]}
    return targets


def subnormals_flushed() -> bool:
    """Whether this process treats subnormal numbers as 0 (FTZ/DAZ) in every thread: a subnormal
    times 2 over enough elements that each of the threads takes a share."""
    # the smallest subnormal fp32 from its bits, so no conversion in this thread can flush it
    x = torch.ones(1 << 20, dtype=torch.int32).view(torch.float32)  # (2^20,) × 1.4e-45
    return bool(((x * 2) == 0).all())


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = args.threads or cores
    # before the first parallel region: OpenMP's threads take the mode from this one at creation
    if args.flush_denormal and not torch.set_flush_denormal(True):
        raise SystemExit("--flush-denormal: this CPU has no flush-to-zero mode PyTorch can set")
    if device.type == "cpu":
        torch.set_num_threads(threads)
    kept = keep_freed_memory("--keep-freed-memory", args.keep_freed_memory)  # mmap threshold, or 0
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    if "bf16" in precisions and (why := gemm.bf16_warning(device)):
        log(f"warning: {why}")
    cfg = model_config(args)
    flops = flops_per_image(cfg, args.caption_len, args.batch)
    load_before = [round(x, 2) for x in os.getloadavg()]
    log(f"measuring matmul peak ({args.peak_size}²) …")
    peak = matmul_peaks(args.peak_size, device, repeats=2 if args.smoke else 7,
                        bf16=wants_bf16_peak(precisions, device))
    inputs = random_inputs(cfg, args.batch, args.caption_len, device, args.seed)
    reference, variants, compile_s = build_variants(args, cfg, inputs, device, precisions)
    workers = [v for v in variants if v.pids]
    try:
        check = None
        if not args.skip_naive:
            log("checking fp32 equality of library and naive …")
            checked = tuple(v for v in workers if v.name.startswith("library") and v.precision == "fp32")
            check = equality_check(reference, inputs, args.seed, compiled=args.compile,
                                   data_parallel=checked, compile_mode=args.compile_mode)
        times, cpu_times = {}, {}
        with OtherLoad(own_pids=[pid for v in workers for pid in v.pids]) as others:
            for phase in ("train", "sample"):
                log(f"timing {phase}: {len(variants)} variants × ({args.warmup} warm-up + "
                    f"{args.repeats}) runs")
                times[phase], cpu_times[phase] = round_robin(variants, phase, args.warmup, args.repeats,
                                                             device)
    finally:
        for v in workers:
            v.close()
    results = {v.name: {phase: summarise(times[phase][v.name], cpu_times[phase][v.name], args.batch,
                                         variant_flops(v, flops, phase), peak[v.precision],
                                         len(v.pids) or threads)
                        for phase in ("train", "sample")} for v in variants}
    load_after = [round(x, 2) for x in os.getloadavg()]
    busy = device.type == "cpu" and others.cores is not None and others.cores > BUSY_CORES
    report = {
        "preset": "smoke" if args.smoke else args.preset, "batch": args.batch, "cores": cores,
        "busy": busy, "other_processes_cores": others.cores,
        "caption_len": args.caption_len, "threads": threads, "device": str(device),
        "cpu": platform.processor() or platform.machine(), "cpu_vendor": gemm.cpu_vendor(),
        "gemm_backend": gemm.backend(), "batched_backend": gemm.batched_backend(),
        "openblas_core": openblas.corename() if openblas.loaded() else None,
        "cpu_bf16_native": gemm.cpu_bf16_native(),
        "kernel_env": kernel_environment(), "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "flush_denormal": args.flush_denormal, "keep_freed_memory": kept,
        "block_cache": allocator.block_cache_installed(),
        "compile_mode": args.compile_mode,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "subnormals_flushed": subnormals_flushed(),
        "torch": torch.__version__,
        "repeats": args.repeats, "warmup": args.warmup, "loadavg_before": load_before,
        "loadavg_after": load_after, "peak_size": args.peak_size,
        "peak_gflops": peak, "flops_per_image": flops, "check": check, "compile_s": compile_s,
        "results": results, "ratios": ratios(results, times),
    }
    report["ceiling"] = fp32_ceiling(results, flops, peak)
    for v in variants:
        if isinstance(v, ProductsOnly):
            report["products_floor"] = products_floor(results, v)
    if check:
        report["targets"] = fp32_targets(report["ratios"], check)
    print_table(report)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
