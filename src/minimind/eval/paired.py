"""How far an accuracy change on the same held-out items stands from noise.

Two models graded on the same items differ only where one is right and the other wrong, so the
change is counted item by item: ``fixed`` items go from wrong to right, ``broken`` ones from right to
wrong, and with ``d_i = after_i - before_i`` in {-1, 0, 1}

    delta = mean(d) = (fixed - broken) / n
    se    = sqrt( sum_i (d_i - delta)^2 / (n (n - 1)) )                  (items as independent draws)

Items are not always independent draws: the demo's 100 single-digit arithmetic items are 24 problems
in several phrasings, and a model gets a problem right or wrong in most of its phrasings at once.
With the items grouped by problem (``c`` = one problem, ``G`` problems) the cluster-robust standard
error counts each problem as one draw:

    se_problems = sqrt( G / (G - 1) * sum_c ( sum_{i in c} (d_i - delta) )^2 ) / n

(with one item per problem it equals ``se``).  ``mcnemar_p`` is the exact two-sided McNemar test:
under "no change" each of the ``m = fixed + broken`` discordant items is equally likely to go either
way, ``p = min(1, 2 * P[Binomial(m, 1/2) <= min(fixed, broken)])``.  It assumes independent items;
the clustered error is the one to read where problems repeat.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class PairedChange:
    """The item-by-item change between two gradings of the same ``n`` items (see the module docstring)."""

    n: int
    fixed: int
    broken: int
    delta: float
    se: float
    se_problems: float
    problems: int
    mcnemar_p: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def paired_change(before: Sequence[bool], after: Sequence[bool],
                  problems: Sequence[Hashable] | None = None) -> PairedChange:
    """Count ``before -> after`` item by item; ``problems[i]`` names item ``i``'s problem (default:
    every item its own)."""
    if len(before) != len(after):
        raise ValueError(f"before has {len(before)} items, after {len(after)}: grade the same items")
    n = len(before)
    if problems is None:
        problems = range(n)
    elif len(problems) != n:
        raise ValueError(f"{len(problems)} problem names for {n} items")
    d = [int(bool(a)) - int(bool(b)) for b, a in zip(before, after)]
    fixed, broken = d.count(1), d.count(-1)
    delta = (fixed - broken) / n if n else 0.0
    se = math.sqrt(sum((x - delta) ** 2 for x in d) / (n * (n - 1))) if n > 1 else 0.0
    sums: dict[Hashable, float] = defaultdict(float)
    for x, c in zip(d, problems):
        sums[c] += x - delta
    g = len(sums)
    se_problems = math.sqrt(g / (g - 1) * sum(s * s for s in sums.values())) / n if g > 1 else 0.0
    return PairedChange(n=n, fixed=fixed, broken=broken, delta=delta, se=se, se_problems=se_problems,
                        problems=g, mcnemar_p=mcnemar_exact_p(fixed, broken))


def mcnemar_exact_p(fixed: int, broken: int) -> float:
    """Two-sided exact McNemar p-value of ``fixed`` against ``broken`` discordant items."""
    m = fixed + broken
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, j) for j in range(min(fixed, broken) + 1)) / 2 ** m
    return min(1.0, 2 * tail)
