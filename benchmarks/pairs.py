"""How much paired timings of two variants say: the sign test and an interval for the median.

Timed rounds on a drifting machine are paired (A and B run back to back in every round), so
each round gives one ratio A/B. Neither function assumes a distribution: the sign test asks
how likely B's wins are if each round were a coin flip, and the median's interval is read off
the sorted ratios at the ranks the binomial distribution gives (the classic order-statistic
interval). Used by ``ab_trees.py`` and ``throughput.py``; run as a script it reads the rounds
back from their saved logs (stderr) and prints both for each comparison:

    python benchmarks/pairs.py docs/benchmarks/ab-*.txt docs/benchmarks/mnist-captions-*.txt
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
from collections.abc import Sequence
from pathlib import Path

# a log line of a timed round of ``ab_trees.py`` or ``throughput.py`` (their stderr): phase,
# then "NAME SECONDSs (cpu …)" per variant; warm-up rounds are marked and left out
ROUND = re.compile(r"^\s+(train|sample) round \d+/\d+(?:, reversed)?: (.*)$")
TIMING = re.compile(r"(\S+) ([\d.]+)s \(cpu [\d.]+s\)")

def _binomial_cdf(k: int, n: int) -> float:
    """P(X ≤ k) for X ~ Binomial(n, ½)."""
    return sum(math.comb(n, i) for i in range(k + 1)) / 2**n


def sign_test(wins: int, n: int) -> float:
    """Two-sided p-value of ``wins`` of ``n`` paired rounds (ties count as neither).

    1.0 when ``n`` is 0. Example: 10 of 15 gives 0.30, 11 of 11 gives 0.001.
    """
    if not 0 <= wins <= n:
        raise ValueError(f"wins must lie in 0..n, got {wins} of {n}")
    if n == 0:
        return 1.0
    return min(1.0, 2 * _binomial_cdf(min(wins, n - wins), n))


def median_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """An interval that holds the median of the values' distribution with at least ``confidence``.

    The k-th smallest and k-th largest value, k the largest rank with P(X < k) ≤ (1 −
    confidence)/2 for X ~ Binomial(n, ½). None when there are too few values for that
    confidence (fewer than 6 at 95 %). Example: 11 values give the 2nd smallest and the 2nd
    largest (98.8 % coverage).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    xs, tail = sorted(values), (1 - confidence) / 2
    k = 0
    while k < len(xs) // 2 and _binomial_cdf(k, len(xs)) <= tail:  # P(X < k + 1) ≤ tail
        k += 1
    return (xs[k - 1], xs[len(xs) - k]) if k else None


def paired(ratios: Sequence[float]) -> dict:
    """Per-round ratios (faster variant > 1) → their median, its 95 % interval, the rounds won
    (ratio above 1) and the sign test's p-value (ties left out)."""
    wins = sum(r > 1 for r in ratios)
    return {"median": statistics.median(ratios), "ci95": median_interval(ratios), "wins": wins,
            "sign_test_p": sign_test(wins, sum(r != 1 for r in ratios))}


def describe(figures: dict) -> str:
    """``paired``'s figures as one phrase: "1.012× paired, 95 % interval 0.962–1.066×, …"."""
    interval = figures["ci95"]
    shown = f"{interval[0]:.3f}–{interval[1]:.3f}×" if interval else "none"
    return (f"{figures['median']:.3f}× paired, 95 % interval {shown}, "
            f"faster in {figures['wins']} (sign test p = {figures['sign_test_p']:.2g})")


def logged_rounds(text: str) -> dict[str, dict[str, list[float]]]:
    """{phase: {variant: seconds per timed round}} from an ``ab_trees.py`` or ``throughput.py``
    log (``ab_trees.py`` names its variants a and b)."""
    rounds: dict[str, dict[str, list[float]]] = {}
    for line in text.splitlines():
        if m := ROUND.match(line):
            for name, seconds in TIMING.findall(m[2]):
                rounds.setdefault(m[1], {}).setdefault(name, []).append(float(seconds))
    return rounds


def comparisons(times: dict[str, list[float]]) -> list[tuple[str, list[float]]]:
    """(label, per-round speed-ups) of a phase's variants: B over A in an A/B log, every other
    variant over the naive fp32 reference in a ``throughput.py`` log (else nothing)."""
    if set(times) == {"a", "b"}:
        return [("B over A", [a / b for a, b in zip(times["a"], times["b"], strict=True)])]
    base = times.get("naive_fp32")
    if base is None:
        return []
    return [(f"{name} over naive_fp32", [n / t for n, t in zip(base, ts, strict=True)])
            for name, ts in times.items() if name != "naive_fp32"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("logs", nargs="+", type=Path,
                   help="saved ab_trees.py or throughput.py output (stderr included)")
    args = p.parse_args(argv)
    for path in args.logs:
        for phase, times in logged_rounds(path.read_text()).items():
            for label, ratios in comparisons(times):
                print(f"{path.name} {phase}: {label}, {len(ratios)} rounds: {describe(paired(ratios))}")


if __name__ == "__main__":
    main()
