"""Pure selection rules over searched candidates: the accuracy/cost Pareto front, and the best
passing candidate under an objective (highest sparsity, or lowest latency/MACs/params/bytes)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from itertools import groupby
from typing import Any, TypeVar

T = TypeVar("T")

OBJECTIVES = ("sparsity", "latency", "macs", "params", "bytes")

# Candidate dict key each objective ranks on. "sparsity" is maximised, every other one minimised.
OBJECTIVE_KEYS = {"sparsity": "ratio", "latency": "p50_ms", "macs": "macs", "params": "params", "bytes": "bytes"}


def _usable(v: Any) -> bool:
    # None means "not measured"; NaN would make every dominance comparison False and so
    # silently put the candidate on the front.
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def dominates(a_acc: float, a_cost: float, b_acc: float, b_cost: float) -> bool:
    """a dominates b: at least as accurate and at most as costly, strictly better in one."""
    return a_acc >= b_acc and a_cost <= b_cost and (a_acc > b_acc or a_cost < b_cost)


def pareto_front(points: Sequence[T], acc: Callable[[T], float], cost: Callable[[T], float]) -> list[T]:
    """The candidates no other candidate dominates (maximise ``acc``, minimise ``cost``), by cost ascending.

    Candidates whose cost (or accuracy) is None or NaN are left out: they cannot be placed.
    Identical (acc, cost) points do not dominate each other, so duplicates on the front are all
    kept, in input order. O(n log n): sort by cost, keep a cost group's best if it beats every
    strictly cheaper group.
    """
    scored = [(cost(p), acc(p), i, p) for i, p in enumerate(points)]
    scored = [s for s in scored if _usable(s[0]) and _usable(s[1])]
    scored.sort(key=lambda s: (s[0], s[2]))  # stable on input order within equal cost
    front: list[T] = []
    best = -math.inf  # highest accuracy among strictly cheaper groups
    for _, group in groupby(scored, key=lambda s: s[0]):
        group = list(group)
        top = max(s[1] for s in group)
        if top > best:  # an equal accuracy at a lower cost would dominate this group
            front.extend(s[3] for s in group if s[1] == top)
            best = top
    return front


def choose(
    candidates: Iterable[dict],
    objective: str = "sparsity",
    passed: Callable[[dict], bool] | None = None,
    key: Callable[[dict], float | None] | None = None,
) -> dict | None:
    """The best passing candidate under ``objective``, or None when none passes.

    Candidates are dicts with "ratio", "val_acc", "passed" and the objective's key from
    ``OBJECTIVE_KEYS`` ("latency" ranks on "p50_ms"). "sparsity" wants the highest value, the
    other objectives the lowest. ``passed`` overrides the pass test (default: ``c["passed"]``);
    ``key`` overrides the value ranked on. A candidate whose value is missing (None/NaN) is
    skipped: it cannot be ranked. Ties go to the higher val_acc, then the lower ratio, then the
    earlier candidate, so the choice never depends on dict or set ordering.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    passed = passed or (lambda c: bool(c.get("passed")))
    name = OBJECTIVE_KEYS[objective]
    key = key or (lambda c: c.get(name))
    sign = -1.0 if objective == "sparsity" else 1.0  # rank ascending on sign * value
    best, best_rank = None, None
    for i, c in enumerate(candidates):
        if not passed(c):
            continue
        v = key(c)
        if not _usable(v):
            continue
        va, ratio = c.get("val_acc"), c.get("ratio")
        rank = (sign * v, -va if _usable(va) else math.inf, ratio if _usable(ratio) else math.inf, i)
        if best_rank is None or rank < best_rank:
            best, best_rank = c, rank
    return best
