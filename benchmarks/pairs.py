"""How much paired timings of two variants say: the sign test and an interval for the median.

Timed rounds on a drifting machine are paired (A and B run back to back in every round), so
each round gives one ratio A/B. Neither function assumes a distribution: the sign test asks
how likely B's wins are if each round were a coin flip, and the median's interval is read off
the sorted ratios at the ranks the binomial distribution gives (the classic order-statistic
interval). Used by ``ab_trees.py``; run as a script it reads the rounds back from saved
``ab_trees.py`` logs (its stderr) and prints both for each:

    python benchmarks/pairs.py docs/benchmarks/ab-*.txt
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
from collections.abc import Sequence
from pathlib import Path

# an ab_trees.py log line of a timed round (warm-up rounds are marked and left out)
ROUND = re.compile(r"^\s+(train|sample) round \d+/\d+(?:, reversed)?: a ([\d.]+)s .*, b ([\d.]+)s ")


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


def logged_rounds(text: str) -> dict[str, tuple[list[float], list[float]]]:
    """{phase: (A's seconds, B's seconds)} of the timed rounds in an ``ab_trees.py`` log."""
    rounds: dict[str, tuple[list[float], list[float]]] = {}
    for line in text.splitlines():
        if m := ROUND.match(line):
            a, b = rounds.setdefault(m[1], ([], []))
            a.append(float(m[2]))
            b.append(float(m[3]))
    return rounds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("logs", nargs="+", type=Path, help="saved ab_trees.py output (stderr included)")
    args = p.parse_args(argv)
    for path in args.logs:
        for phase, (a, b) in logged_rounds(path.read_text()).items():
            ratios = [x / y for x, y in zip(a, b, strict=True)]
            wins = sum(r > 1 for r in ratios)
            interval = median_interval(ratios)
            shown = f"{interval[0]:.3f}–{interval[1]:.3f}" if interval else "none"
            print(f"{path.name} {phase}: {len(ratios)} pairs, B {statistics.median(ratios):.3f}× A "
                  f"paired, 95 % interval {shown}, faster in {wins} (sign test p = "
                  f"{sign_test(wins, sum(r != 1 for r in ratios)):.2g})")


if __name__ == "__main__":
    main()
