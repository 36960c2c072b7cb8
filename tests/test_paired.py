"""Paired (exact McNemar) drop interval, checked against references computed another way."""

from __future__ import annotations

import math
import time
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prunelab.report.stats import (
    clopper_pearson,
    mcnemar_p_value,
    paired_counts,
    paired_drop,
    paired_drop_interval,
    passes_paired,
)


def grid_clopper_pearson(k: int, m: int, confidence: float = 0.95, step: float = 1e-6) -> tuple[float, float]:
    """Reference: scan p on a fine grid, binomial CDF summed directly from math.comb terms."""
    half = (1 - confidence) / 2
    p = np.arange(step, 1.0, step)
    pmf = np.array([math.comb(m, j) * p**j * (1 - p) ** (m - j) for j in range(m + 1)])
    cdf_k = pmf[: k + 1].sum(axis=0)  # P(X <= k)
    sf_k = pmf[k:].sum(axis=0)  # P(X >= k)
    lo = 0.0 if k == 0 else p[np.argmax(sf_k >= half)]  # first grid p where the upper tail reaches alpha/2
    hi = 1.0 if k == m else p[np.nonzero(cdf_k >= half)[0][-1]]  # last grid p where the lower tail still does
    return float(lo), float(hi)


def exact_tail(k: int, m: int, p: float, upper: bool) -> float:
    """P(X >= k) or P(X <= k) in exact rational arithmetic at the float ``p``."""
    q = Fraction(p)
    ks = range(k, m + 1) if upper else range(0, k + 1)
    return float(sum(math.comb(m, j) * q**j * (1 - q) ** (m - j) for j in ks))


def test_known_values_b10_c2_against_grid():
    # b=10, c=2, n=1000: m=12 discordant images, of which 10 went the dense model's way.
    lo_p, hi_p = grid_clopper_pearson(10, 12)
    lo, hi = paired_drop_interval(10, 2, 1000)
    assert lo == pytest.approx((2 * lo_p - 1) * 12 / 1000 * 100, abs=3e-6)
    assert hi == pytest.approx((2 * hi_p - 1) * 12 / 1000 * 100, abs=3e-6)
    # Beta quantiles Beta(0.025; 10, 3) = 0.51586..., Beta(0.975; 11, 2) = 0.97914...
    assert clopper_pearson(10, 12) == pytest.approx((0.5158622513, 0.9791374745), abs=1e-9)
    assert (lo, hi) == pytest.approx((0.0380694, 1.1499299), abs=1e-6)


@pytest.mark.parametrize(("k", "m"), [(0, 5), (1, 1), (3, 7), (7, 7), (2, 30)])
def test_small_cases_against_grid(k, m):
    assert clopper_pearson(k, m) == pytest.approx(grid_clopper_pearson(k, m), abs=2e-6)


def test_against_scipy_beta_quantiles():
    beta = pytest.importorskip("scipy.stats").beta
    for k, m, conf in [(10, 12, 0.95), (1, 20000, 0.95), (9000, 20000, 0.9), (150, 400, 0.99), (19999, 20000, 0.95)]:
        a = (1 - conf) / 2
        lo, hi = clopper_pearson(k, m, conf)
        assert lo == pytest.approx(beta.ppf(a, k, m - k + 1), rel=1e-9)
        assert hi == pytest.approx(beta.ppf(1 - a, k + 1, m - k), rel=1e-9)


def test_large_m_is_fast_and_sane():
    t0 = time.perf_counter()
    lo, hi = paired_drop_interval(5200, 4800, 10000)
    assert time.perf_counter() - t0 < 2.0
    # Normal approximation to McNemar's: drop 4 points, se = sqrt(b + c - (b - c)^2 / n) / n.
    se = math.sqrt(10000 - 400**2 / 10000) / 10000 * 100
    assert lo == pytest.approx(4 - 1.96 * se, abs=0.05)
    assert hi == pytest.approx(4 + 1.96 * se, abs=0.05)


def test_no_discordant_pairs_gives_zero_interval():
    assert paired_drop_interval(0, 0, 500) == (0.0, 0.0)
    assert mcnemar_p_value(0, 0) == 1.0
    assert passes_paired(0, 0, 500, tolerance_points=0.0)
    d = paired_drop([True, False, True], [True, False, True])
    assert d == {"drop": 0.0, "ci": [0.0, 0.0], "b": 0, "c": 0, "n": 3, "confidence": 0.95,
                 "method": "exact-mcnemar"}


def test_paired_counts_and_drop_from_sequences():
    dense = [1, 1, 1, 0, 0, 1, 1, 0]
    cand = [1, 0, 0, 1, 0, 1, 0, 0]
    assert paired_counts(dense, cand) == (3, 1, 8)
    assert paired_counts(np.array(dense, bool), np.array(cand, bool)) == (3, 1, 8)
    d = paired_drop(dense, cand, confidence=0.9)
    assert d["drop"] == pytest.approx(25.0)
    assert d["ci"] == pytest.approx(list(paired_drop_interval(3, 1, 8, 0.9)))
    assert d == paired_drop(b=3, c=1, n=8, confidence=0.9)
    with pytest.raises(ValueError):
        paired_counts([1, 0], [1])
    with pytest.raises(ValueError):
        paired_drop(dense, cand, b=1, c=1, n=8)
    with pytest.raises(ValueError):
        paired_drop(b=1, c=1)
    with pytest.raises(ValueError):
        paired_drop()


def test_invalid_counts_raise():
    for b, c, n in [(-1, 0, 5), (3, 3, 5), (0, 0, 0)]:
        with pytest.raises(ValueError):
            paired_drop_interval(b, c, n)
    with pytest.raises(ValueError):
        paired_drop_interval(1, 1, 10, confidence=1.0)


def test_interval_shrinks_with_n():
    widths = []
    for scale in (1, 4, 16, 64):
        lo, hi = paired_drop_interval(10 * scale, 2 * scale, 1000 * scale)
        assert lo <= 0.8 <= hi
        widths.append(hi - lo)
    assert all(a > b for a, b in zip(widths, widths[1:], strict=False))
    # Roughly 1/sqrt(n): quadrupling the images about halves the width.
    assert widths[3] / widths[2] == pytest.approx(0.5, abs=0.05)


def test_passes_paired_uses_upper_bound():
    lo, hi = paired_drop_interval(10, 2, 1000)
    assert passes_paired(10, 2, 1000, tolerance_points=hi + 1e-9)
    assert not passes_paired(10, 2, 1000, tolerance_points=hi - 1e-6)
    # The point drop (0.8) is within 1 point but the upper bound (1.15) is not.
    assert not passes_paired(10, 2, 1000, tolerance_points=1.0)
    # Higher confidence widens the interval, so it can fail where lower confidence passes.
    assert paired_drop_interval(10, 2, 1000, 0.99)[1] > hi > paired_drop_interval(10, 2, 1000, 0.8)[1]


def test_mcnemar_known_values():
    # Exact two-sided: 2 * P(X <= 2 | 12, 1/2) = 2 * (1 + 12 + 66) / 4096.
    assert mcnemar_p_value(10, 2) == pytest.approx(2 * 79 / 4096)
    assert mcnemar_p_value(2, 10) == mcnemar_p_value(10, 2)
    assert mcnemar_p_value(5, 5) == 1.0
    assert mcnemar_p_value(3, 0) == pytest.approx(2 / 8)


counts = st.integers(0, 60).flatmap(
    lambda b: st.integers(0, 60).flatmap(lambda c: st.tuples(st.just(b), st.just(c), st.integers(max(b + c, 1), 5000)))
)


@settings(max_examples=150, deadline=None)
@given(counts, st.sampled_from([0.8, 0.9, 0.95, 0.99]))
def test_properties(bcn, confidence):
    b, c, n = bcn
    lo, hi = paired_drop_interval(b, c, n, confidence)
    drop = (b - c) / n * 100
    # Contains the point estimate and stays within what m discordant images can move.
    assert lo - 1e-9 <= drop <= hi + 1e-9
    m = b + c
    assert -m / n * 100 - 1e-9 <= lo <= hi <= m / n * 100 + 1e-9
    # Symmetry: swapping b and c negates and swaps the interval.
    lo2, hi2 = paired_drop_interval(c, b, n, confidence)
    assert lo2 == pytest.approx(-hi, abs=1e-9)
    assert hi2 == pytest.approx(-lo, abs=1e-9)
    if m:
        # The bounds are the Clopper-Pearson crossings: exact tails there equal alpha/2.
        p_lo, p_hi = clopper_pearson(b, m, confidence)
        half = (1 - confidence) / 2
        if b > 0:
            assert exact_tail(b, m, p_lo, upper=True) == pytest.approx(half, rel=1e-7)
        if b < m:
            assert exact_tail(b, m, p_hi, upper=False) == pytest.approx(half, rel=1e-7)
    # The test and the interval agree: p >= alpha exactly when 0 lies inside the interval.
    assert (mcnemar_p_value(b, c) >= 1 - confidence) == (lo <= 0 <= hi)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=300))
def test_counts_property(pairs):
    dense, cand = zip(*pairs, strict=True)
    b, c, n = paired_counts(dense, cand)
    assert n == len(pairs)
    assert b - c == sum(dense) - sum(cand)  # the drop only depends on the discordant images
    assert paired_drop(dense, cand)["drop"] == pytest.approx((sum(dense) - sum(cand)) / n * 100)
