"""Accuracy with its uncertainty: a Wilson 95% interval over the number of images, and the paired
(exact McNemar) interval for the drop between two models judged on the same images."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

Z95 = 1.959963984540054


def wilson_interval(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """95% interval of an accuracy, in percent (Wilson score: sane near 0 and 100%)."""
    if total <= 0:
        return (0.0, 100.0)
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    # The interval always holds the observed share; at 0 or n correct its end is exactly that share
    # (the formula lands a rounding error inside it: 99.99999999999999 for n of n).
    lo = 0.0 if correct <= 0 else 100.0 * min(p, max(0.0, centre - half))
    hi = 100.0 if correct >= total else 100.0 * max(p, min(1.0, centre + half))
    return (lo, hi)


def accuracy(correct: int, total: int) -> dict:
    lo, hi = wilson_interval(correct, total)
    return {"value": 100.0 * correct / total if total else 0.0, "correct": correct, "n": total, "ci95": [lo, hi]}


def drop_within_noise(dense: dict, pruned: dict) -> bool:
    """True when the accuracy drop is smaller than the half-width of the dense 95% interval."""
    half = (dense["ci95"][1] - dense["ci95"][0]) / 2
    return dense["value"] - pruned["value"] < half


# --- Paired statistics -------------------------------------------------------------------------
# Dense and candidate are scored on the same validation images, so their errors are correlated:
# the drop's uncertainty comes only from the images on which they disagree. Two independent
# Wilson intervals would overstate it; conditioning on the discordant pairs (McNemar) does not.


def paired_counts(dense_correct: Iterable[Any], cand_correct: Iterable[Any]) -> tuple[int, int, int]:
    """(b, c, n) from per-image correctness: b = dense right & candidate wrong, c = the reverse.

    Both sequences must list the same images in the same order (and so have the same length).
    """
    b = c = n = 0
    for d, k in zip(dense_correct, cand_correct, strict=True):
        d, k = bool(d), bool(k)
        b += d and not k
        c += k and not d
        n += 1
    return b, c, n


def _check_counts(b: int, c: int, n: int) -> None:
    if b < 0 or c < 0 or n <= 0 or b + c > n:
        raise ValueError(f"need 0 <= b, c, b + c <= n and n > 0; got b={b}, c={c}, n={n}")


def _binom_tails(k: int, m: int, p: float) -> tuple[float, float]:
    """(P(X <= k), P(X > k)) for X ~ Binomial(m, p), 0 < p < 1.

    The pmf is taken in log space (lgamma), so nothing overflows for m in the tens of thousands.
    Only the tail that lies away from the mode is summed (its terms shrink monotonically, so the
    sum stops once the rest provably cannot matter); the other tail is its complement. The small
    tail, the one that decides a confidence bound, is thus exact to rounding, not 1 - (1 - x).
    """
    if k < 0:
        return 0.0, 1.0
    if k >= m:
        return 1.0, 0.0
    lp, lq = math.log(p), math.log1p(-p)
    up = k + 1 > math.floor((m + 1) * p)  # the mode lies at or below k: the upper tail is the small one
    start = k + 1 if up else k
    log_first = math.lgamma(m + 1) - math.lgamma(start + 1) - math.lgamma(m - start + 1) + start * lp + (m - start) * lq
    step = lp - lq if up else lq - lp
    total, log_rel, j = 1.0, 0.0, start  # terms relative to the first (the largest) one
    while 0 <= (j + 1 if up else j - 1) <= m:
        log_r = step + (math.log(m - j) - math.log(j + 1) if up else math.log(j) - math.log(m - j + 1))
        log_rel += log_r
        j = j + 1 if up else j - 1
        term = math.exp(log_rel)
        total += term
        r = math.exp(log_r)  # the ratios keep falling away from the mode, so the rest is < term * r / (1 - r)
        if r < 1 and term * r / (1 - r) < 1e-17 * total:
            break
    small = min(1.0, math.exp(log_first) * total)
    return (1.0 - small, small) if up else (small, 1.0 - small)


def _bisect(f: Callable[[float], bool], lo: float = 0.0, hi: float = 1.0) -> float:
    """The boundary between where ``f`` is False (near lo) and True (near hi), to float precision."""
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        if f(mid):
            hi = mid
        else:
            lo = mid
    return 0.5 * (lo + hi)


def clopper_pearson(k: int, m: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval for a binomial proportion, k successes out of m.

    p_lo solves P(X >= k | p) = alpha/2 and p_hi solves P(X <= k | p) = alpha/2: the beta
    quantiles, found by bisection on the binomial CDF rather than an incomplete-beta inverse.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if not 0 <= k <= m or m <= 0:
        raise ValueError(f"need 0 <= k <= m and m > 0; got k={k}, m={m}")
    half = (1 - confidence) / 2
    # P(X >= k) grows with p, P(X <= k) shrinks: each bound is a monotone crossing.
    p_lo = 0.0 if k == 0 else _bisect(lambda p: _binom_tails(k - 1, m, p)[1] >= half)
    p_hi = 1.0 if k == m else _bisect(lambda p: _binom_tails(k, m, p)[0] <= half)
    return p_lo, p_hi


def paired_drop_interval(b: int, c: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Confidence interval, in percentage points, for the paired accuracy drop (b - c) / n * 100.

    This is the exact McNemar-based interval, conditional on the m = b + c discordant images:
    given m, b ~ Binomial(m, p) and drop = (2p - 1) * m / n * 100, so the Clopper-Pearson interval
    (p_lo, p_hi) maps to ((2 p_lo - 1) m / n * 100, (2 p_hi - 1) m / n * 100). It is
    conservative (coverage >= confidence given m), treats m as fixed, and m = 0 gives (0, 0):
    models that never disagree on these images have no measurable drop on them.
    """
    _check_counts(b, c, n)
    m = b + c
    if m == 0:
        return 0.0, 0.0
    p_lo, p_hi = clopper_pearson(b, m, confidence)
    scale = m / n * 100.0
    return (2 * p_lo - 1) * scale, (2 * p_hi - 1) * scale


def mcnemar_p_value(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: 2 * P(X <= min(b, c)) for X ~ Binomial(b + c, 1/2), capped at 1.

    Doubling the smaller tail makes it agree with the interval above: p >= 1 - confidence exactly
    when 0 lies inside ``paired_drop_interval`` (Clopper-Pearson is the inversion of this test).
    The report uses the interval ("0 inside the interval") for "indistinguishable from zero".
    """
    if b < 0 or c < 0:
        raise ValueError(f"need b, c >= 0; got b={b}, c={c}")
    m = b + c
    if m == 0:
        return 1.0
    return min(1.0, 2.0 * _binom_tails(min(b, c), m, 0.5)[0])


def paired_drop(
    dense_correct: Iterable[Any] | None = None,
    cand_correct: Iterable[Any] | None = None,
    *,
    b: int | None = None,
    c: int | None = None,
    n: int | None = None,
    confidence: float = 0.95,
) -> dict:
    """The paired drop (dense - candidate, points) with its exact McNemar interval.

    Give either both per-image correctness sequences, or the counts ``b``, ``c`` and ``n``.
    """
    seqs, counts = dense_correct is not None or cand_correct is not None, (b, c, n) != (None, None, None)
    if seqs == counts:
        raise ValueError("give either dense_correct and cand_correct, or b, c and n")
    if seqs:
        if dense_correct is None or cand_correct is None:
            raise ValueError("give both dense_correct and cand_correct")
        b, c, n = paired_counts(dense_correct, cand_correct)
    elif b is None or c is None or n is None:
        raise ValueError("give all of b, c and n")
    lo, hi = paired_drop_interval(b, c, n, confidence)
    return {"drop": (b - c) / n * 100.0, "ci": [lo, hi], "b": b, "c": c, "n": n,
            "confidence": confidence, "method": "exact-mcnemar"}


def passes_paired(b: int, c: int, n: int, tolerance_points: float, confidence: float = 0.95) -> bool:
    """True when the upper bound of the paired drop is within ``tolerance_points`` (percentage points)."""
    return paired_drop_interval(b, c, n, confidence)[1] <= tolerance_points


# --- Speed --------------------------------------------------------------------------------------
# A speedup is the ratio of p50s of two models timed in turns; its interval is the 5-95% range of
# the per-iteration paired ratios (dense_i / model_i), the noise of that very timing.

NOISY_CV = 0.10  # a timing whose per-iteration spread exceeds 10% of its mean is flagged as noisy


def speed_verdict(paired_5_95) -> str:
    """"faster" or "slower" where the paired interval excludes 1.0, else "no measurable difference"."""
    lo, hi = paired_5_95
    if lo > 1.0:
        return "faster"
    if hi < 1.0:
        return "slower"
    return "no measurable difference"


def speed_text(value: float, paired_5_95) -> str:
    """A speedup as a report quotes it: never a bare number, never one whose interval holds 1.0."""
    lo, hi = paired_5_95
    verdict = speed_verdict(paired_5_95)
    if verdict == "no measurable difference":
        return f"no measurable difference (paired 5-95% {lo:.2f}-{hi:.2f})"
    return f"{value:.2f}x{', slower' if verdict == 'slower' else ''} (paired 5-95% {lo:.2f}-{hi:.2f})"
