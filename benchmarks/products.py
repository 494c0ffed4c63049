"""The matrix products of one alignDRAW step, and nothing else: how fast could a step be?

``throughput.py --products`` times :class:`ProductsOnly` beside the library and the naive
reference. It runs the plain matrix products (not batched: the LSTMs, the projections, the
caption's keys and gates, and their gradients; 94 % of a mnist-captions step's product FLOPs)
of one training step (or sampling batch) in the shapes below, back to back, through the
library's product backend (``aligndraw.gemm``), with their operands and outputs allocated once
and no other work: no attention, no elementwise kernels, no gate nonlinearities, no copies, no
autograd, no optimiser. Its time estimates the floor of an implementation that runs these
products in these shapes through the same product library, so ``naive ms / products ms``
estimates the most such an implementation can be faster than the naive reference on the
machine it runs on.

An estimate, within a few percent either way: the schedule has ``flops.py``'s count and its
simplifications, slightly more product FLOPs than the library runs (every step's full
h_dec projection, where the library's first step has one row, its last projects the write
only, and sampling forms the write heads after the loop); the weight gradients are stacked
over T·B rows where the compiled library with MKL products leaves them as ``addmm`` chains
(``benchmarks/accumulate.py`` times both forms at about the same speed); forward weights are
not transposed views; and the operands are the same buffers every step, so they stay in cache
better than a real step's activations would.

The schedule's small batched products (the filterbanks, the alignment scores, the context mix)
are counted but not run: their form is an implementation's choice (the library fuses the
scores into elementwise kernels and builds a step's filterbanks in one call), and as plain
``torch.bmm`` calls of 100 small matrices they take longer than the library spends on them.

The schedule follows the library's algorithm (``aligndraw.model``, docs/performance.md) with
``flops.py``'s simplifications (above; and every product, batched ones included, has two
gradient products, where the library skips a few it does not need):

- per caption: the caption LSTM's input gates as a per-vocabulary table (or per word when the
  vocabulary is larger than the batch's words), its recurrence in both directions, the
  alignment keys U h_lang and the caption's share of the generative gates W_s h_lang;
- per drawing step: one product for everything h_dec drives (both LSTMs' gate shares, read and
  write windows, write patch, alignment query, prior; without the inference share and the read
  window when sampling), the inference LSTM's other inputs (read glimpses and h_enc), the
  posterior, the generative LSTM's z_t share, the alignment scores vᵀσ(·) over the caption's
  words and the context mix Σ_j α_j (W_s h_lang_j) as batched products, the read filterbanks
  (F_y x F_xᵀ for x and the canvas) and the write filterbanks (F̂_yᵀ w F̂_x; when sampling the
  second product of all T writes at once, over T·M columns);
- training backward: for every product Y = A·B one product for dA = dY·Bᵀ and one for
  dB = Aᵀ·dY, the weight gradients of step-shared weights as one product over T·B rows (over
  L·B rows for each direction of the caption recurrence).

``python benchmarks/products.py`` times each product of the schedule on its own, batched ones
included.

The schedule is derived from shapes, ``flops.py`` from formulas; a test checks that their
FLOPs agree (they share the simplifications above).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aligndraw import gemm, openblas  # noqa: E402
from aligndraw.config import ModelConfig  # noqa: E402
from benchmarks.machine import timed  # noqa: E402


@dataclass(frozen=True)
class Product:
    """``count`` products (b × m × k)·(b × k × n); ``b`` = 0: one ``torch.mm``, else ``torch.bmm``."""

    name: str
    m: int
    k: int
    n: int
    b: int = 0
    count: int = 1
    per_step: bool = False  # called once per drawing step, in turn with the step's other products

    @property
    def flops(self) -> int:
        return 2 * max(self.b, 1) * self.m * self.k * self.n * self.count

    def grads(self, shared_over: int = 0) -> list[Product]:
        """The backward products of Y = A·B: dA = dY·Bᵀ (m×n · n×k) and dB = Aᵀ·dY (k×m · m×n).

        ``shared_over`` = S > 0: B is a weight shared by S calls of ``count`` = S; its gradient
        Σ_s A_sᵀ dY_s is one product over S·m rows (as the library's eager ``StepLinear`` and
        its compiled oneDNN and bf16 gradients form it).
        """
        d_a = Product(f"{self.name}/dA", self.m, self.n, self.k, self.b, self.count, self.per_step)
        if shared_over:
            if self.b or self.count != shared_over:
                raise ValueError(f"{self.name}: only a plain product called once per share is stacked")
            d_b = Product(f"{self.name}/dB", self.k, shared_over * self.m, self.n)
        else:
            d_b = Product(f"{self.name}/dB", self.k, self.m, self.n, self.b, self.count, self.per_step)
        return [d_a, d_b]


def _caption(cfg: ModelConfig, batch: int, caption_len: int) -> list[tuple[Product, int]]:
    """(product, steps it shares its weight over, 0 = not shared) of the caption encoder."""
    d, d2, words = cfg.lang_hidden, 2 * cfg.lang_hidden, batch * caption_len
    if cfg.vocab_size <= words:  # the input gates as a table: one row per vocabulary word
        gates = Product("caption_input_table", cfg.vocab_size, cfg.embed_dim, 4 * d, count=2)
    else:  # one row per word of the batch
        gates = Product("caption_input_words", words, cfg.embed_dim, 4 * d, count=2)
    return [(gates, 0)] + [(Product(f"caption_recurrence_{direction}", batch, d, 4 * d, count=caption_len),
                            caption_len) for direction in ("forward", "backward")] + [
            (Product("align_keys", words, d2, cfg.align_dim), 0),
            (Product("context_gates", words, d2, 4 * cfg.dec_hidden), 0)]


def _step(cfg: ModelConfig, batch: int, caption_len: int, train: bool) -> list[tuple[Product, bool]]:
    """(product, whether its B operand is a step-shared weight) of one drawing step."""
    c, h, w, n, m = cfg.channels, cfg.height, cfg.width, cfg.read_n, cfg.write_n
    de, dd, z, a = cfg.enc_hidden, cfg.dec_hidden, cfg.z_dim, cfg.align_dim
    # everything h_dec drives: generative gates, prior, write window and patch, query (+ training:
    # inference gates and read window)
    outputs = 4 * dd + 2 * z + 5 + c * m * m + a + (4 * de + 5 if train else 0)
    out = [(Product("projection", batch, dd, outputs), True),
           (Product("dec_z", batch, z, 4 * dd), True),
           (Product("align_scores", caption_len, a, 1, b=batch), False),
           (Product("context_mix", 1, caption_len, 4 * dd, b=batch), False),
           (Product("write_patch_rows", h, m, m, b=batch * c), False)]
    if train:
        out += [(Product("enc_input", batch, 2 * c * n * n + de, 4 * de), True),
                (Product("posterior", batch, de, 2 * z), True),
                (Product("read_rows", n, h, w, b=2 * batch * c), False),
                (Product("read_cols", n, w, n, b=2 * batch * c), False),
                (Product("write_cols", h, m, w, b=batch * c), False)]
    return out


def schedule(cfg: ModelConfig, batch: int, caption_len: int, phase: str) -> list[Product]:
    """The products of one training step (``phase`` "train") or sampling batch ("sample").

    Training: the forward products, each drawing step's own (T of them per ``Product``), then
    their gradients. Sampling: the forward's decoder side; the write's second product once for
    all T steps, over T·M columns. Only alignDRAW's schedule is defined.
    """
    if cfg.model != "aligndraw":
        raise ValueError(f"the product schedule is alignDRAW's; model {cfg.model!r} is not covered")
    if phase not in ("train", "sample"):
        raise ValueError(f"phase must be 'train' or 'sample', got {phase!r}")
    t = cfg.steps
    train = phase == "train"
    caption = _caption(cfg, batch, caption_len)
    steps = [(Product(p.name, p.m, p.k, p.n, p.b, t, per_step=True), shared)
             for p, shared in _step(cfg, batch, caption_len, train)]
    forward = [p for p, _ in caption] + [p for p, _ in steps]
    if not train:  # F̂_yᵀ w_t for all t, side by side (H × T·M), times the stacked F̂_x (T·M × W)
        c = cfg.channels
        return forward + [Product("write_cols_all_steps", cfg.height, t * cfg.write_n, cfg.width,
                                  b=batch * c)]
    step_grads = [g for p, shared in steps for g in p.grads(t if shared else 0)]
    caption_grads = [g for p, shared in caption for g in p.grads(shared)]
    # the steps' own gradients step by step, then the stacked weight gradients
    return (forward + [g for g in step_grads if g.per_step] + [g for g in step_grads if not g.per_step]
            + caption_grads)


def schedule_flops(products: list[Product]) -> int:
    return sum(p.flops for p in products)


def plain(products: list[Product]) -> list[Product]:
    """The products of a schedule that are not batched: one matrix times one matrix each."""
    return [p for p in products if not p.b]


class ProductsOnly:
    """A throughput.py variant that runs a phase's plain products (:func:`plain` of
    :func:`schedule`) and nothing else.

    Operands are random normal values (no subnormal numbers), allocated once per distinct
    shape with their outputs; ``train_step`` / ``sample_step`` run every product through the
    library's fp32 product backend (``aligndraw.gemm``: ``torch.mm`` into the preallocated
    output, or oneDNN or OpenBLAS where the library would use them), a drawing step's products in turn.
    """

    pids: tuple[int, ...] = ()
    worker_cpu_s = 0.0
    precision = "fp32"

    def __init__(self, cfg: ModelConfig, batch: int, caption_len: int, device: torch.device,
                 seed: int = 0, name: str = "products_fp32") -> None:
        self.name = name
        g = torch.Generator().manual_seed(seed)
        self._operands: dict[tuple[int, int, int, int], tuple[torch.Tensor, ...]] = {}
        self.schedules = {phase: schedule(cfg, batch, caption_len, phase) for phase in ("train", "sample")}
        self._plans = {phase: plan(plain(products), g, device, self._operands)
                       for phase, products in self.schedules.items()}
        # per phase, the share of its product FLOPs that the variant runs
        self.share_of_flops = {phase: schedule_flops(plain(products)) / schedule_flops(products)
                               for phase, products in self.schedules.items()}

    def train_step(self) -> None:
        run(self._plans["train"])

    def sample_step(self) -> None:
        run(self._plans["sample"])


def plan(products: list[Product], g: torch.Generator, device: torch.device,
         operands: dict[tuple[int, int, int, int], tuple[torch.Tensor, ...]]) -> list:
    """[(rounds, [(mm or bmm, a, b, out), …])] for :func:`run`: consecutive per-step products
    take turns. Operands (random normal) and outputs come from ``operands``, keyed by
    (b, m, k, n), and are allocated there when missing."""
    out: list[tuple[int, list, bool]] = []
    for p in products:
        key = (p.b, p.m, p.k, p.n)
        if key not in operands:
            lead = (p.b,) if p.b else ()
            a = torch.randn(*lead, p.m, p.k, generator=g).to(device)  # (b?, m, k)
            b = torch.randn(*lead, p.k, p.n, generator=g).to(device)  # (b?, k, n)
            operands[key] = (a, b, torch.empty(*lead, p.m, p.n, device=device))
        call = (_batched_product(device) if p.b else _plain_product(device), *operands[key])
        # a step's forward products take turns, and then its gradients (the next group)
        group = p.per_step and ("gradient" if "/" in p.name else "forward")
        if group and out and out[-1][0] == p.count and out[-1][2] == group:
            out[-1][1].append(call)
        else:
            out.append((p.count, [call], group))
    return [(rounds, calls) for rounds, calls, _ in out]


def _gemm_mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """a @ b through ``aligndraw.gemm.mm``: oneDNN or OpenBLAS (the backend) where b's sides
    are both at least ``gemm.MIN_SIZE``, else ``@``; a new output, as the library's oneDNN and
    OpenBLAS calls make (``out`` is left alone)."""
    return gemm.mm(a, b)


def _plain_product(device: torch.device):
    """The plain products' function for the process's backend: ``_gemm_mm`` where
    ``aligndraw.gemm`` chooses oneDNN or OpenBLAS, else ``torch.mm`` into ``out``."""
    return _gemm_mm if device.type == "cpu" and gemm.backend() != "aten" else torch.mm


def _openblas_bmm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """a @ b per matrix through OpenBLAS's batched op; a new output (``out`` is left alone)."""
    return openblas.bmm(a, b)


def _tall_bmm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """a @ b per matrix as ``aligndraw.gemm.tall_bmm`` forms it (tall results transposed); a new
    output (``out`` is left alone)."""
    return gemm.tall_bmm(a, b)


def _batched_product(device: torch.device):
    """The batched products' function: ``_openblas_bmm`` where ``aligndraw.gemm`` chooses
    OpenBLAS for them and its op is loaded (``gemm.prepare``), ``_tall_bmm`` where the library
    forms tall results transposed (``gemm.transposes_tall_products``), else ``torch.bmm`` into
    ``out``. Every batched product of the schedule goes through it, also the one-row and
    one-column ones that the compiled library leaves to inductor (``compiler.openblas_batched``)."""
    if device.type == "cpu" and gemm.batched_backend() == "openblas" and openblas.loaded():
        return _openblas_bmm
    if device.type == "cpu" and gemm.transposes_tall_products():
        return _tall_bmm
    return torch.bmm


def run(planned: list) -> None:
    """Every call of a :func:`plan` (``torch.mm`` and ``torch.bmm`` write into the preallocated
    output; ``_gemm_mm`` makes a new one)."""
    for rounds, calls in planned:
        for _ in range(rounds):
            for product, a, b, out in calls:
                product(a, b, out=out)


def time_each(cfg: ModelConfig, batch: int, caption_len: int, phase: str, repeats: int,
              device: torch.device) -> list[dict]:
    """Every product of a phase's schedule timed on its own (its ``count`` calls in a row),
    batched ones included: median milliseconds and GFLOP/s over ``repeats`` after one warm-up."""
    rows = []
    g = torch.Generator().manual_seed(0)
    for p in schedule(cfg, batch, caption_len, phase):
        planned = plan([p], g, device, {})
        run(planned)
        times = [timed(partial(run, planned), device) for _ in range(repeats)]
        ms = statistics.median(times) * 1e3
        rows.append({"name": p.name, "b": p.b, "m": p.m, "k": p.k, "n": p.n, "count": p.count,
                     "ms": ms, "gflops": p.flops / ms / 1e6})
    return rows


def main(argv: list[str] | None = None) -> dict:
    """Print every product of a step, timed on its own, with plain and batched totals; JSON last."""
    from aligndraw.config import preset
    from benchmarks.throughput import PRESETS, SMOKE_CONFIG

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--preset", choices=PRESETS, default="mnist-captions")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--caption-len", type=int, default=12)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true",
                        help="the unit tests' tiny model, batch 8, 6-word captions, one repeat "
                             "(in place of --preset, --batch, --caption-len and --repeats)")
    args = parser.parse_args(argv)
    for name in ("batch", "caption_len", "repeats", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be ≥ 1, got {value}")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = preset(args.preset).model
    if args.smoke:
        cfg = ModelConfig(**SMOKE_CONFIG)
        args.batch, args.caption_len, args.repeats = 8, 6, 1
    gemm.prepare()  # OpenBLAS's op loaded where a backend is OpenBLAS (or that backend is aten)
    report = {"preset": "smoke" if args.smoke else args.preset, "batch": args.batch,
              "caption_len": args.caption_len, "threads": torch.get_num_threads(),
              "gemm_backend": gemm.backend(), "batched_backend": gemm.batched_backend(),
              "phases": {}}
    print(f"preset {report['preset']}, batch {args.batch}, {args.caption_len}-word captions, "
          f"{report['threads']} threads, fp32 products: {report['gemm_backend']}, "
          f"batched: {report['batched_backend']}")
    for phase in ("train", "sample"):
        rows = time_each(cfg, args.batch, args.caption_len, phase, args.repeats, torch.device("cpu"))
        totals = {kind: sum(r["ms"] for r in rows if bool(r["b"]) == (kind == "batched"))
                  for kind in ("plain", "batched")}
        report["phases"][phase] = {"products": rows, "total_ms": totals}
        for r in rows:
            shape = f"{r['b']} × " * bool(r["b"]) + f"{r['m']}×{r['k']}·{r['k']}×{r['n']}"
            print(f"{phase:<7}{r['name']:<28}{shape:>28} ×{r['count']:<4}{r['ms']:>9.2f} ms"
                  f"{r['gflops']:>8.1f} GFLOP/s")
        print(f"{phase}: plain products {totals['plain']:.1f} ms, batched {totals['batched']:.1f} ms "
              "(each timed on its own)")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
