"""The item-by-item change between two models on the same held-out items (minimind.eval.paired)."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from minimind.eval.paired import mcnemar_exact_p, paired_change


def _random_gradings(n: int, seed: int) -> tuple[list[bool], list[bool]]:
    rng = random.Random(seed)
    before = [rng.random() < 0.6 for _ in range(n)]
    after = [b if rng.random() < 0.8 else not b for b in before]
    return before, after


def test_counts_delta_and_standard_error_match_a_naive_computation() -> None:
    before, after = _random_gradings(200, seed=1)
    c = paired_change(before, after)
    d = [int(a) - int(b) for b, a in zip(before, after)]
    assert c.n == 200 and c.fixed == sum(x == 1 for x in d) and c.broken == sum(x == -1 for x in d)
    assert c.fixed > 0 and c.broken > 0
    assert c.delta == pytest.approx(statistics.fmean(d))
    assert c.se == pytest.approx(statistics.stdev(d) / math.sqrt(len(d)))
    # one item per problem: the clustered error is the item-level one
    assert c.problems == 200 and c.se_problems == pytest.approx(c.se)


def test_repeated_phrasings_of_a_problem_do_not_shrink_the_clustered_error() -> None:
    """The same 40 problem-level changes with each problem asked 5 ways: the item-level error shrinks by
    about sqrt(5) (it takes the copies for independent draws), the clustered one stays the 40
    problems' own error."""
    before, after = _random_gradings(40, seed=2)
    one = paired_change(before, after)
    rep = paired_change([b for b in before for _ in range(5)], [a for a in after for _ in range(5)],
                        problems=[i for i in range(40) for _ in range(5)])
    assert rep.delta == pytest.approx(one.delta) and rep.problems == 40
    assert rep.se_problems == pytest.approx(one.se)
    assert rep.se == pytest.approx(one.se * math.sqrt(39 / 199), rel=1e-9)  # n(n-1) with n 40 -> 200
    assert rep.se < 0.5 * rep.se_problems


def test_mcnemar_exact_p_is_the_two_sided_binomial_test_of_the_discordant_items() -> None:
    assert mcnemar_exact_p(12, 2) == pytest.approx(2 * (1 + 14 + 91) / 2 ** 14)  # 0.0129
    assert mcnemar_exact_p(0, 0) == 1.0 and mcnemar_exact_p(3, 3) == 1.0
    assert mcnemar_exact_p(5, 0) == pytest.approx(2 / 32)
    stats = pytest.importorskip("scipy.stats")
    for fixed, broken in ((12, 2), (4, 3), (0, 9), (20, 7), (1, 30)):
        want = stats.binomtest(fixed, fixed + broken, 0.5).pvalue
        assert mcnemar_exact_p(fixed, broken) == pytest.approx(want, rel=1e-9)
        assert mcnemar_exact_p(broken, fixed) == pytest.approx(want, rel=1e-9)


def test_gradings_of_other_items_are_refused() -> None:
    with pytest.raises(ValueError, match="same items"):
        paired_change([True, False], [True])
    with pytest.raises(ValueError, match="problem names"):
        paired_change([True, False], [True, True], problems=["a"])
