"""The accuracy-constrained ratio search, as pure functions over an ``evaluate`` callable.

A ratio passes when its validation accuracy >= dense accuracy - tolerance (percentage points).
The search evaluates a coarse grid, then refines at ``refine_step`` between the last passing
and the first failing coarse ratio. Two rules read the resulting curve:

- ``contiguous`` (default): the highest ratio below which every evaluated ratio passed;
- ``highest``: the notebook's rule, the highest passing ratio even past a failure; on a noisy
  curve it picks a ratio that a re-evaluation can fail.

Under ``contiguous`` nothing above the first failing ratio of a phase can change the answer, so
unless ``full_curve`` is set each phase (the coarse grid ascending, then the refinement
ascending) stops at its first failure: same answer, fewer candidates, and ``highest`` is then
unknown (``best_ratio_highest`` is None). ``highest`` always evaluates the full curve.

``evaluate(ratio, max_errors)`` may stop once a candidate has made more than ``max_errors``
mistakes: such a candidate cannot pass any more, so its verdict is the same as with a full pass
and its accuracy is reported as an upper bound.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Protocol

RULES = ("contiguous", "highest")


@dataclass
class Evaluation:
    """One candidate's validation result: ``correct`` of ``seen`` images out of ``total``."""

    ratio: float
    correct: int
    seen: int
    total: int
    stopped: bool = False
    nonzero: int | None = None
    extra: dict = field(default_factory=dict)
    # The accuracy drop against the dense model judged on the same images (report.stats.paired_drop),
    # and, under search.confidence, whether its upper bound is within the tolerance (None: not asked).
    paired: dict | None = None
    paired_ok: bool | None = None

    def passed(self, threshold: float) -> bool:
        return verdict(self, threshold)

    @property
    def acc(self) -> float:
        """Accuracy in percent over the whole split; for a stopped candidate, an upper bound."""
        if self.stopped:
            return 100.0 * (self.correct + self.total - self.seen) / self.total
        return 100.0 * self.correct / self.total

    def to_dict(self, threshold: float | None = None) -> dict:
        """The report's entry; with ``threshold``, also whether it passed."""
        d = asdict(self)
        d.update(d.pop("extra"))
        d["val_acc"] = self.acc
        d["acc_is_bound"] = self.stopped
        if threshold is not None:
            d["passed"] = verdict(self, threshold)
        return d


def pass_threshold(dense_acc: float, tolerance: float) -> float:
    """The accuracy in percent a candidate must reach: the one place the tolerance is applied."""
    if tolerance < 0:
        raise ValueError(f"search.tolerance must be >= 0, got {tolerance}")
    return dense_acc - tolerance


def passes(correct: int, total: int, threshold: float) -> bool:
    """The one pass rule: accuracy in percent >= threshold. Every verdict goes through here."""
    return correct * 100.0 >= threshold * total


def required_correct(total: int, threshold: float) -> int:
    """Fewest correct predictions out of ``total`` that pass ``threshold``."""
    c = max(0, min(total, math.ceil(threshold * total / 100.0)))
    while c > 0 and passes(c - 1, total, threshold):
        c -= 1
    while c <= total and not passes(c, total, threshold):
        c += 1
    return c


def max_errors(total: int, threshold: float) -> int:
    """Mistakes a candidate may make and still pass; one more and it has failed."""
    return total - required_correct(total, threshold)


def verdict(e: Evaluation, threshold: float) -> bool:
    """The point rule, and under ``search.confidence`` the paired rule too (a candidate whose drop
    cannot be bounded within the tolerance fails even when its point estimate passes)."""
    if e.stopped or e.paired_ok is False:
        return False
    return passes(e.correct, e.total, threshold)


def pick(curve: Iterable[tuple[float, bool]], rule: str) -> float:
    """Choose a ratio from (ratio, passed) pairs; 0.0 when nothing qualifies."""
    if rule not in RULES:
        raise ValueError(f"search.rule must be one of {RULES}, got {rule!r}")
    best = 0.0
    for ratio, ok in sorted(curve):
        if ok:
            best = ratio
        elif rule == "contiguous":
            break
    return best


def _steps_between(lo: float, hi: float, step: float) -> list[float]:
    n = int(round((hi - lo) / step))
    return [round(lo + i * step, 6) for i in range(1, n) if lo + i * step < hi - 1e-9]


def refinement(coarse: Mapping[float, bool], step: float, upper: float = 1.0) -> list[float]:
    """Ratios between the last passing and the first failing coarse ratio, for both rules."""
    ratios = sorted(coarse)
    spans = []
    for rule in RULES:
        best = pick(coarse.items(), rule)
        above = [r for r in ratios if r > best]
        spans.append((best, above[0] if above else upper))
    out: list[float] = []
    for lo, hi in dict.fromkeys(spans):
        out.extend(r for r in _steps_between(lo, hi, step) if r not in coarse and r not in out)
    return sorted(out)


class Candidate(Protocol):
    """What a search curve holds: an ``Evaluation``, or an iterative ``Step`` (pruned, then recovered)."""

    ratio: float

    @property
    def seen(self) -> int: ...

    def passed(self, threshold: float) -> bool: ...

    def to_dict(self, threshold: float | None = None) -> dict: ...


@dataclass
class SearchResult:
    """A finished search: both rules' answers and every candidate evaluated, in ratio order.
    ``to_dict`` is the one report builder for one-shot and iterative searches alike."""

    dense_acc: float
    threshold: float
    tolerance: float
    rule: str
    best_ratio: float
    best_ratio_highest: float | None  # None when the curve stopped at the first failure
    best_ratio_contiguous: float
    curve: list[Candidate]
    full_curve: bool = True

    def passed(self, ratio: float) -> bool:
        return any(e.ratio == ratio and e.passed(self.threshold) for e in self.curve)

    @property
    def images_evaluated(self) -> int:
        return sum(e.seen for e in self.curve)

    def to_dict(self) -> dict:
        return {
            "tolerance": self.tolerance,
            "rule": self.rule,
            "dense_val_acc": self.dense_acc,
            "threshold": self.threshold,
            "best_ratio": self.best_ratio,
            "best_ratio_highest": self.best_ratio_highest,
            "best_ratio_contiguous": self.best_ratio_contiguous,
            "full_curve": self.full_curve,
            "curve": [e.to_dict(self.threshold) for e in self.curve],
            "images_evaluated": self.images_evaluated,
        }


def search(
    evaluate: Callable[[float, int | None], Evaluation],
    dense_acc: float,
    grid: Iterable[float],
    tolerance: float = 1.0,
    rule: str = "contiguous",
    refine_step: float | None = 0.01,
    exact: bool = False,
    total: int | None = None,
    known: Mapping[float, Evaluation] | None = None,
    on_result: Callable[[Evaluation], None] | None = None,
    full_curve: bool = False,
) -> SearchResult:
    """Coarse grid, then refinement; returns the answer(s) and every evaluated candidate.

    ``known`` holds candidates evaluated before (a resumed search's journal): they are reused,
    not re-evaluated. ``on_result`` sees each new evaluation (to journal it). ``full_curve``
    (implied by ``rule="highest"``) evaluates every ratio of both phases, so both rules'
    answers are known; otherwise each phase stops at its first failure.
    """
    if rule not in RULES:
        raise ValueError(f"search.rule must be one of {RULES}, got {rule!r}")
    limit = pass_threshold(dense_acc, tolerance)
    budget = None if exact or total is None else max_errors(total, limit)
    full_curve = bool(full_curve) or rule == "highest"
    results: dict[float, Evaluation] = {}
    known = dict(known or {})

    def run(ratios: Iterable[float]) -> None:
        for r in sorted(round(float(r), 6) for r in ratios):
            if r not in results:
                e = known.get(r)
                if e is None:
                    e = evaluate(r, budget)
                    if on_result is not None:
                        on_result(e)
                results[r] = e
            if not full_curve and not verdict(results[r], limit):
                break  # above a failure nothing changes the contiguous answer

    run(grid)
    if refine_step:
        # On a phase stopped at its first failure both rules' spans coincide: the contiguous one.
        coarse = {r: verdict(results[r], limit) for r in results}
        run(refinement(coarse, refine_step))
    verdicts = [(r, verdict(e, limit)) for r, e in results.items()]
    best = {k: pick(verdicts, k) for k in RULES}
    return SearchResult(
        dense_acc=dense_acc,
        threshold=limit,
        tolerance=tolerance,
        rule=rule,
        best_ratio=best[rule],
        best_ratio_highest=best["highest"] if full_curve else None,
        best_ratio_contiguous=best["contiguous"],
        curve=[results[r] for r in sorted(results)],
        full_curve=full_curve,
    )
