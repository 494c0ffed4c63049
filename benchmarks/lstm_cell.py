"""The LSTM cell's update two ways, eager and under torch.compile, forward and with its gradients.

    python benchmarks/lstm_cell.py [--batch 100] [--hidden 300] [--threads 2] [--min-time 1.0]
                                   [--keep-freed-memory]

Times, on one step's (B, 4D) gate pre-activations and (B, D) cell state:
- tanh: ``aligndraw.language.lstm_update_tanh``, ``nn.LSTMCell``'s formula,
  c' = σ(f)·c + σ(i)·tanh(g), h = σ(o)·tanh(c');
- sigmoid: ``aligndraw.language.lstm_update``, the same with tanh(x) = 2σ(2x) − 1 and σ(2g)
  taken in one sigmoid with the gates' (PyTorch's CPU tanh is slower than its sigmoid);
and, eagerly, each forward and backward (the gradients of h and c' with respect to the gates
and c). Also times ``torch.tanh`` against ``torch.sigmoid`` on a (B, D) tensor. Prints the
medians (ms) and the largest absolute difference from the tanh form in fp32; one JSON line
last. ``--keep-freed-memory`` keeps freed memory as the trainer does: without it, whether
glibc serves the sigmoid form's (B, 4D) temporaries from fresh pages depends on its history,
and that form's eager time was seen to vary markedly between runs.
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

from aligndraw.language import lstm_update, lstm_update_tanh  # noqa: E402
from benchmarks.forms import compare_forms  # noqa: E402
from benchmarks.machine import keep_freed_memory, kept_note  # noqa: E402


def tanh_form(gates: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return torch.cat(lstm_update_tanh(gates, c), dim=-1)  # (B, 2D): h, c'


def sigmoid_form(gates: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return torch.cat(lstm_update(gates, c), dim=-1)  # (B, 2D): h, c'


def with_gradients(form):
    """The form's forward and backward: the gradients of Σ w·[h, c'] for gates and c, (B, 5D)."""
    def run(gates: torch.Tensor, c: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        gates, c = gates.detach().requires_grad_(), c.detach().requires_grad_()
        return torch.cat(torch.autograd.grad(form(gates, c), (gates, c), weights), dim=-1)
    return run


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--hidden", type=int, default=300, help="the cell's size D")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-time", type=float, default=1.0, help="seconds per measurement")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="keep freed memory for reuse in this process, as the trainer does")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    kept = keep_freed_memory("--keep-freed-memory", args.keep_freed_memory)  # mmap threshold, or 0
    print(f"batch {args.batch}, D {args.hidden}, threads {args.threads}" + kept_note(kept, ", "))
    g = torch.Generator().manual_seed(0)
    gates = 2 * torch.randn(args.batch, 4 * args.hidden, generator=g)
    c = torch.randn(args.batch, args.hidden, generator=g)
    weights = torch.randn(args.batch, 2 * args.hidden, generator=g)
    x = c.clone()
    result: dict = {"shape": [args.batch, 4 * args.hidden], "threads": args.threads,
                    "keep_freed_memory": kept}

    def largest(out: torch.Tensor, ref: torch.Tensor) -> float:
        return float((out - ref).abs().max())

    for name, op in (("op_tanh", torch.tanh), ("op_sigmoid", torch.sigmoid)):  # one op, eager
        timer = Timer("op(x)", globals={"op": op, "x": x}, num_threads=torch.get_num_threads())
        result[f"{name}_eager_ms"] = ms = timer.blocked_autorange(min_run_time=args.min_time).median * 1e3
        print(f"{name:>12}     eager: {ms:7.4f} ms   one op on (B, D)")
    forms = [("tanh", tanh_form, (gates, c)), ("sigmoid", sigmoid_form, (gates, c))]
    backward = [(f"{name}_grad", with_gradients(form), (gates, c, weights))
                for name, form in (("tanh", tanh_form), ("sigmoid", sigmoid_form))]
    # every eager timing before the first compile, whose worker processes may still be busy
    result |= compare_forms(forms, tanh_form(gates, c), largest, args.min_time, modes=("eager",))
    result |= compare_forms(backward, with_gradients(tanh_form)(gates, c, weights), largest,
                            args.min_time, modes=("eager",))
    result |= compare_forms(forms, tanh_form(gates, c), largest, args.min_time, modes=("compiled",))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
