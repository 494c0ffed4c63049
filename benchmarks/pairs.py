"""How much paired timings of two variants say: the sign test and an interval for the median.

Timed rounds on a drifting machine are paired (A and B run back to back in every round), so
each round gives one ratio A/B. Neither function assumes a distribution: the sign test asks
how likely B's wins are if each round were a coin flip, and the median's interval is read off
the sorted ratios at the ranks the binomial distribution gives (the classic order-statistic
interval). Used by ``ab_trees.py`` and ``throughput.py``; run as a script it reads the rounds
back from their saved logs (stderr) and prints both for each comparison, and ``balanced``'s:

    python benchmarks/pairs.py docs/benchmarks/ab-*.txt docs/benchmarks/mnist-captions-*.txt

Running second in a round can cost time of its own: in ``ab_trees.py`` the first run of a
round follows the same worker's run in the round before (the orders alternate: A B, B A, A B,
…), the second follows the other worker's, whose work has probably evicted the first one's
data from the caches. Sampling ran 1.145–1.215× slower second than first on the Zen 5
(docs/performance-log.md). A round's ratio then carries that cost one way or the other by
its order, and a side that runs first in more rounds gets it into its median. ``balanced``
takes two consecutive rounds, one in each order, as one block, so that the cost cancels.
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


def balanced(ratios: Sequence[float]) -> dict | None:
    """``paired``'s figures (and ``blocks``, their number) over blocks of two consecutive
    rounds, each block's ratio the geometric mean of its rounds' ratios; ratios in timed
    order, every round in the reverse order of the one before (``throughput.round_robin``).
    A factor P for running second enters one round of a block as P and the other as 1/P, so
    it cancels, as does a drift that is linear over the block. An odd last round is left out;
    None without a block."""
    blocks = [math.sqrt(x * y) for x, y in zip(ratios[0::2], ratios[1::2], strict=False)]
    return paired(blocks) | {"blocks": len(blocks)} if blocks else None


def second_run_cost(ratios: Sequence[float], reversed_rounds: Sequence[bool]) -> float | None:
    """How many times longer the second run of a round took than the first, from an A/B's
    per-round ratios A/B and which rounds ran B first: the median over blocks (as
    ``balanced``'s) of √(ratio with B first / ratio with A first). 1 when order costs
    nothing; None without a block holding both orders."""
    costs = []
    for i in range(0, len(ratios) - 1, 2):
        (x, x_rev), (y, y_rev) = zip(ratios[i:i + 2], reversed_rounds[i:i + 2], strict=True)
        if x_rev != y_rev:
            first_a, first_b = (y, x) if x_rev else (x, y)  # ratios with A first, with B first
            costs.append(math.sqrt(first_b / first_a))
    return statistics.median(costs) if costs else None


def describe(figures: dict) -> str:
    """``paired``'s figures as one phrase: "1.012× paired, 95 % interval 0.962–1.066×, …"."""
    interval = figures["ci95"]
    shown = f"{interval[0]:.3f}–{interval[1]:.3f}×" if interval else "none"
    return (f"{figures['median']:.3f}× paired, 95 % interval {shown}, "
            f"faster in {figures['wins']} (sign test p = {figures['sign_test_p']:.2g})")


def describe_balanced(figures: dict | None, second_run: float | None = None) -> str:
    """``balanced``'s figures (and ``second_run_cost``) as one phrase."""
    if figures is None:
        return "no block of two rounds in both orders"
    interval = figures["ci95"]
    shown = f"{interval[0]:.3f}–{interval[1]:.3f}×" if interval else "none"
    blocks = figures["blocks"]
    cost = f"; run second of the two in a round, a step took {second_run:.3f}× as long" if second_run else ""
    return (f"by blocks of both orders {figures['median']:.3f}× (95 % interval {shown}, "
            f"faster in {figures['wins']} of {blocks} blocks, "
            f"sign test p = {figures['sign_test_p']:.2g}){cost}")


def logged_rounds(text: str) -> dict[str, dict[str, list[float]]]:
    """{phase: {variant: seconds per timed round}} from an ``ab_trees.py`` or ``throughput.py``
    log (``ab_trees.py`` names its variants a and b)."""
    rounds: dict[str, dict[str, list[float]]] = {}
    for line in text.splitlines():
        if m := ROUND.match(line):
            for name, seconds in TIMING.findall(m[2]):
                rounds.setdefault(m[1], {}).setdefault(name, []).append(float(seconds))
    return rounds


def logged_orders(text: str) -> dict[str, list[bool]]:
    """{phase: whether each timed round ran in reverse order} from the same log as
    ``logged_rounds`` (its ", reversed" marks)."""
    orders: dict[str, list[bool]] = {}
    for line in text.splitlines():
        if m := ROUND.match(line):
            orders.setdefault(m[1], []).append(", reversed:" in line)
    return orders


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
        text = path.read_text()
        orders = logged_orders(text)
        for phase, times in logged_rounds(text).items():
            alternating = all(x != y for x, y in zip(orders[phase], orders[phase][1:], strict=False))
            ab = set(times) == {"a", "b"}  # else the two compared runs need not be adjacent
            for label, ratios in comparisons(times):
                second = second_run_cost(ratios, orders[phase]) if ab else None
                blocks = (describe_balanced(balanced(ratios), second)
                          if alternating else "the rounds did not alternate their order: no blocks")
                print(f"{path.name} {phase}: {label}, {len(ratios)} rounds: {describe(paired(ratios))}; "
                      f"{blocks}")


if __name__ == "__main__":
    main()
