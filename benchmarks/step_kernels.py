"""Eager training's step kernels against the PyTorch ops they replace, forward and backward.

    python benchmarks/step_kernels.py [--batch 100] [--threads 2] [--min-time 1.0]
                                      [--keep-freed-memory]

At mnist-captions' shapes (``--batch`` images; 60×60 canvas, 8×8 grids, LSTMs of 300, Z = 150,
A = 512, captions of 12 words), one drawing step's piece each way, with gradients
(``aligndraw.step_kernels``, ``docs/performance.md`` item 38):

- attend: a step's write and read windows from their raw numbers (columns of one projection)
  to γ, F_x, F_y, against ``attention.window_params`` and ``filterbanks_batched``;
- lstm: the cell from two gate shares and c, against ``language.lstm_update``;
- posterior_kl: z and KL against the learned prior, against the model's PyTorch form;
- scores: the alignment's scores, against ``alignment.factored_scores``.

Each is timed as forward and backward (the gradients of Σ w·out for fixed random w). Prints the
medians (ms), the speed-up and the largest gradient difference relative to the largest
gradient; one JSON line last. Needs the kernels (a C++ compiler and ninja).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aligndraw import attention, step_kernels  # noqa: E402
from aligndraw.alignment import factored_scores, key_factors  # noqa: E402
from aligndraw.config import ModelConfig  # noqa: E402
from aligndraw.language import lstm_update, sigmoid_tanh  # noqa: E402
from aligndraw.losses import gaussian_kl  # noqa: E402
from benchmarks.machine import keep_freed_memory, kept_note  # noqa: E402


def _attend_pieces(cfg: ModelConfig, batch: int, g: torch.Generator):
    wide = torch.randn(batch, 10, generator=g) * 0.5  # a step's write and read numbers

    def split(x):
        return [x[:, :5], x[:, 5:]]

    def kernel(x):
        return list(step_kernels.attend(split(x), cfg.height, cfg.width, cfg.read_n, cfg.filter_eps,
                                        attention.flush_exponent(torch.float32)))

    def pytorch(x):
        windows = [attention.window_params(p, cfg.height, cfg.width, cfg.read_n) for p in split(x)]
        banks = attention.filterbanks_batched(windows, [cfg.read_n] * 2, cfg.height, cfg.width,
                                              cfg.filter_eps)
        return [torch.cat([w.gamma for w in windows])] + [torch.cat(f) for f in zip(*banks, strict=True)]
    return [wide], kernel, pytorch


def _lstm_pieces(cfg: ModelConfig, batch: int, g: torch.Generator):
    d = cfg.dec_hidden
    inputs = [torch.randn(batch, 4 * d, generator=g) * 2, torch.randn(batch, 4 * d, generator=g),
              torch.randn(batch, d, generator=g)]
    return (inputs, lambda a, b, c: list(step_kernels.lstm([a, b], c)),
            lambda a, b, c: list(lstm_update(a + b, c)))


def _posterior_pieces(cfg: ModelConfig, batch: int, g: torch.Generator):
    z = cfg.z_dim
    eps = torch.randn(batch, z, generator=g)

    def pytorch(post, prior):
        mu_q, log_sigma_q = post.chunk(2, dim=-1)
        return [mu_q + log_sigma_q.exp() * eps,
                gaussian_kl(mu_q, log_sigma_q, *sigmoid_tanh(prior).chunk(2, dim=-1))]
    return ([torch.randn(batch, 2 * z, generator=g), torch.randn(batch, 2 * z, generator=g)],
            lambda post, prior: list(step_kernels.posterior_kl(post, prior, eps)), pytorch)


def _scores_pieces(cfg: ModelConfig, batch: int, g: torch.Generator, words: int = 12):
    keys2 = torch.randn(batch, words, cfg.align_dim, generator=g)
    factors = key_factors(keys2)
    inputs = [keys2, torch.randn(batch, cfg.align_dim, generator=g), torch.randn(cfg.align_dim, generator=g)]
    return (inputs, lambda k, q, v: [step_kernels.scores(k, factors, q, v)],
            lambda k, q, v: [factored_scores(k, factors, q, v)])


PIECES = {"attend": _attend_pieces, "lstm": _lstm_pieces, "posterior_kl": _posterior_pieces,
          "scores": _scores_pieces}


def with_gradients(form, inputs: list[torch.Tensor], g: torch.Generator):
    """A function running the form forward and backward: the gradients of Σ w·out for its inputs."""
    leaves = [x.detach().requires_grad_() for x in inputs]
    weights = [torch.randn(o.shape, generator=g) for o in form(*leaves)]

    def run() -> list[torch.Tensor]:
        return list(torch.autograd.grad(form(*leaves), leaves, weights))
    return run


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-time", type=float, default=1.0, help="seconds per measurement")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="keep freed memory for reuse in this process, as the trainer does")
    args = p.parse_args(argv)
    if not step_kernels.differentiable(torch.zeros(1)):  # builds (once) and loads them
        why = step_kernels.missing() or "their build failed: see the log"
        raise SystemExit(f"the step kernels are not available here: {why}")
    torch.set_num_threads(args.threads)
    kept = keep_freed_memory("--keep-freed-memory", args.keep_freed_memory)
    cfg = ModelConfig()
    print(f"batch {args.batch}, threads {args.threads}, mnist-captions' shapes" + kept_note(kept, ", "))
    result: dict = {"batch": args.batch, "threads": args.threads, "keep_freed_memory": kept}
    for name, pieces in PIECES.items():
        g = torch.Generator().manual_seed(0)
        inputs, kernel, pytorch = pieces(cfg, args.batch, g)
        runs = {form: with_gradients(fn, inputs, torch.Generator().manual_seed(1))
                for form, fn in (("kernel", kernel), ("pytorch", pytorch))}
        grads = {form: run() for form, run in runs.items()}
        largest = max(float(gp.abs().max()) for gp in grads["pytorch"])
        diff = max(float((a - b).abs().max()) for a, b in zip(grads["kernel"], grads["pytorch"], strict=True))
        ms = {form: Timer("run()", globals={"run": run}, num_threads=args.threads)
              .blocked_autorange(min_run_time=args.min_time).median * 1e3 for form, run in runs.items()}
        result[name] = {"kernel_ms": ms["kernel"], "pytorch_ms": ms["pytorch"],
                        "speedup": ms["pytorch"] / ms["kernel"], "grad_diff_relative": diff / largest}
        print(f"{name:>13}: kernel {ms['kernel']:7.3f} ms, PyTorch's ops {ms['pytorch']:7.3f} ms, "
              f"{ms['pytorch'] / ms['kernel']:.2f}×; gradients differ by {diff / largest:.1e} of the largest")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
