"""Pareto front (max accuracy, min cost) and the objective-driven choice of a passing candidate."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prunelab.search.pareto import OBJECTIVE_KEYS, OBJECTIVES, choose, dominates, pareto_front


def brute_dominated(p, others):
    return any(dominates(q[0], q[1], p[0], p[1]) for q in others)


# Small integer grids make ties and exact duplicates common, which is where fronts go wrong.
point = st.tuples(st.integers(0, 6).map(float), st.one_of(st.none(), st.integers(0, 6).map(float)))


@settings(max_examples=300, deadline=None)
@given(st.lists(point, max_size=25))
def test_front_properties(pts):
    acc, cost = (lambda p: p[0]), (lambda p: p[1])
    front = pareto_front(pts, acc, cost)
    costed = [p for p in pts if p[1] is not None]
    # No candidate on the front is dominated by any candidate.
    assert not any(brute_dominated(f, costed) for f in front)
    # Every costed candidate off the front is dominated by one on it.
    on = {id(f) for f in front}
    for p in costed:
        if id(p) not in on:
            assert brute_dominated(p, front)
    # Exactly the brute-force non-dominated set, duplicates included, none without a cost.
    assert sorted(front) == sorted(p for p in costed if not brute_dominated(p, costed))
    assert all(f[1] is not None for f in front)
    assert [f[1] for f in front] == sorted(f[1] for f in front)
    # Along the front, accuracy strictly rises with cost (equal cost only for duplicates).
    for a, b in zip(front, front[1:], strict=False):
        assert (b[0] > a[0] and b[1] > a[1]) or a == b


def test_front_example_and_duplicates():
    cands = [
        {"name": "a", "acc": 90.0, "ms": 10.0},
        {"name": "b", "acc": 92.0, "ms": 12.0},
        {"name": "c", "acc": 89.0, "ms": 11.0},  # dominated by a
        {"name": "d", "acc": 92.0, "ms": 12.0},  # duplicate of b: both kept, input order
        {"name": "e", "acc": 93.0, "ms": None},  # unmeasured: excluded
        {"name": "f", "acc": 92.0, "ms": 14.0},  # same accuracy as b, slower: dominated
        {"name": "g", "acc": 85.0, "ms": 5.0},
        {"name": "h", "acc": 80.0, "ms": 5.0},  # same cost as g, less accurate: dominated
        {"name": "i", "acc": 91.0, "ms": float("nan")},  # NaN cost: excluded
    ]
    front = pareto_front(cands, lambda c: c["acc"], lambda c: c["ms"])
    assert [c["name"] for c in front] == ["g", "a", "b", "d"]
    assert pareto_front([], lambda c: c, lambda c: c) == []


def cand(method, ratio, val_acc, passed, p50, macs=None, params=None, nbytes=None):
    return {"method": method, "ratio": ratio, "val_acc": val_acc, "passed": passed, "p50_ms": p50,
            "macs": macs, "params": params, "bytes": nbytes}


CANDS = [
    cand("l1", 0.3, 91.0, True, 8.0, macs=200, params=30, nbytes=120),
    cand("l1", 0.5, 90.5, True, 6.0, macs=150, params=20, nbytes=80),
    cand("l1", 0.7, 88.0, False, 3.0, macs=90, params=10, nbytes=40),  # fastest & smallest, fails
    cand("taylor", 0.6, 90.2, True, 5.5, macs=160, params=25, nbytes=100),
    cand("taylor", 0.8, 85.0, False, 2.0, macs=60, params=5, nbytes=20),  # fails
    cand("random", 0.65, 90.1, True, None, macs=155, params=18, nbytes=72),  # latency not measured
]


@pytest.mark.parametrize(
    ("objective", "expected"),
    [
        ("sparsity", ("random", 0.65)),  # highest passing ratio; failing 0.7/0.8 ignored
        ("latency", ("taylor", 0.6)),  # lowest passing p50; the faster failures and the unmeasured one ignored
        ("macs", ("l1", 0.5)),
        ("params", ("random", 0.65)),
        ("bytes", ("random", 0.65)),
    ],
)
def test_choose_each_objective(objective, expected):
    c = choose(CANDS, objective)
    assert (c["method"], c["ratio"]) == expected
    assert c["passed"]


def test_objectives_constant():
    assert OBJECTIVES == ("sparsity", "latency", "macs", "params", "bytes")
    assert set(OBJECTIVE_KEYS) == set(OBJECTIVES)
    with pytest.raises(ValueError):
        choose(CANDS, "accuracy")


def test_choose_none_when_nothing_passes():
    assert choose([c | {"passed": False} for c in CANDS], "latency") is None
    assert choose([], "sparsity") is None


def test_choose_ties_higher_val_acc_then_lower_ratio():
    tied = [
        cand("a", 0.5, 90.0, True, 4.0),
        cand("b", 0.6, 91.0, True, 4.0),  # same latency, more accurate: wins
        cand("c", 0.4, 91.0, True, 4.0),  # same latency and accuracy, lower ratio: wins over b
    ]
    assert choose(tied, "latency")["method"] == "c"
    assert choose(list(reversed(tied)), "latency")["method"] == "c"
    same_ratio = [cand("x", 0.5, 90.0, True, 4.0), cand("y", 0.5, 92.0, True, 3.0)]
    assert choose(same_ratio, "sparsity")["method"] == "y"


def test_choose_custom_pass_and_key():
    # A stricter pass test (val_acc >= 90.5) and a custom key (p90 instead of p50).
    cands = [c | {"p90_ms": (c["p50_ms"] or math.nan) * 1.5} for c in CANDS]
    c = choose(cands, "latency", passed=lambda c: c["val_acc"] >= 90.5, key=lambda c: c["p90_ms"])
    assert (c["method"], c["ratio"]) == ("l1", 0.5)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9), st.integers(80, 92), st.booleans(), st.integers(1, 5)), max_size=15),
       st.sampled_from(OBJECTIVES))
def test_choose_property(rows, objective):
    cands = [cand(f"m{i}", r / 10, float(a), p, float(ms), macs=ms * 10, params=ms, nbytes=ms * 4)
             for i, (r, a, p, ms) in enumerate(rows)]
    c = choose(cands, objective)
    passing = [x for x in cands if x["passed"]]
    if not passing:
        assert c is None
        return
    assert c["passed"]
    value = {"sparsity": lambda x: -x["ratio"]} | {o: (lambda x, k=OBJECTIVE_KEYS[o]: x[k]) for o in OBJECTIVES[1:]}
    v = value[objective]
    assert v(c) == min(v(x) for x in passing)
    assert c["val_acc"] == max(x["val_acc"] for x in passing if v(x) == v(c))
