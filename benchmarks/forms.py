"""Time equal ways of computing one thing, eagerly and under torch.compile (shared by the
small "which form is faster" benchmarks)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.benchmark import Timer

Form = tuple[str, Callable[..., torch.Tensor], Sequence[torch.Tensor]]


def relative_difference(out: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest absolute difference over the reference's largest magnitude (a ``difference``)."""
    return float((out - reference).abs().max() / reference.abs().max())


def compare_forms(forms: Sequence[Form], reference: torch.Tensor,
                  difference: Callable[[torch.Tensor, torch.Tensor], float], min_time: float,
                  modes: Sequence[str] = ("eager", "compiled")) -> dict:
    """Median ms of every form in every mode and its ``difference(out, reference)``.

    Timed at ``torch.get_num_threads()`` threads. Prints one line per form and mode; returns
    ``{NAME_MODE_ms, NAME_MODE_diff}``.
    """
    result: dict = {}
    for name, fn, args in forms:
        for mode in modes:
            f = torch.compile(fn) if mode == "compiled" else fn
            out = f(*args)  # compiles on the first call
            # Timer runs at one thread unless told: use the caller's torch thread count
            ms = Timer("f(*args)", globals={"f": f, "args": tuple(args)},
                       num_threads=torch.get_num_threads()) \
                .blocked_autorange(min_run_time=min_time).median * 1e3
            diff = difference(out, reference)
            result[f"{name}_{mode}_ms"], result[f"{name}_{mode}_diff"] = ms, diff
            print(f"{name:>8} {mode:>9}: {ms:7.3f} ms   difference {diff:.1e}")
    return result
