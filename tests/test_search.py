"""The search rules on synthetic curves, refinement, and early stopping that never changes a verdict."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prunelab.search.rules import (
    Evaluation,
    max_errors,
    passes,
    pick,
    refinement,
    required_correct,
    search,
    verdict,
)

TOTAL = 1000


def curve_evaluator(acc_of, total=TOTAL, calls=None):
    """evaluate() for an accuracy curve; honours the error budget like the real loop (by batches)."""

    def evaluate(ratio, budget):
        if calls is not None:
            calls.append(ratio)
        correct_total = round(acc_of(ratio) / 100 * total)
        preds = [1] * correct_total + [0] * (total - correct_total)
        random.Random(int(ratio * 1000)).shuffle(preds)
        c = seen = 0
        for i in range(0, total, 50):
            chunk = preds[i:i + 50]
            c += sum(chunk)
            seen += len(chunk)
            if budget is not None and seen - c > budget:
                return Evaluation(ratio, c, seen, total, stopped=True)
        return Evaluation(ratio, c, seen, total)

    return evaluate


def test_pick_rules_on_non_monotone_curve():
    curve = [(0.2, True), (0.3, True), (0.4, False), (0.5, True), (0.6, False)]
    assert pick(curve, "contiguous") == 0.3
    assert pick(curve, "highest") == 0.5
    assert pick([(0.2, False), (0.3, True)], "contiguous") == 0.0
    assert pick([(0.2, False)], "highest") == 0.0


def test_refinement_between_last_pass_and_first_fail():
    coarse = {0.2: True, 0.3: True, 0.4: True, 0.5: False, 0.6: False}
    assert refinement(coarse, 0.01) == [round(0.4 + i * 0.01, 6) for i in range(1, 10)]
    # all pass: refine above the grid towards 1.0; none pass: refine below it
    assert refinement({0.8: True, 0.9: True}, 0.01)[-1] == 0.99
    assert refinement({0.2: False, 0.3: False}, 0.05) == [0.05, 0.1, 0.15]


def test_refinement_covers_both_rules_when_they_differ():
    coarse = {0.2: True, 0.3: False, 0.4: True, 0.5: False}
    r = refinement(coarse, 0.05)
    assert 0.25 in r and 0.45 in r


def smooth(r):  # dense 90%, falls past 0.45
    return 90.0 if r <= 0.45 else 90.0 - (r - 0.45) * 60


def test_search_smooth_curve_finds_edge_with_refinement():
    res = search(curve_evaluator(smooth), 90.0, [0.2, 0.3, 0.4, 0.5, 0.6], tolerance=1.0, total=TOTAL,
                 full_curve=True)
    # 0.46: 89.4 pass; 0.47: 88.8 fail
    assert res.best_ratio == 0.46 == res.best_ratio_highest == res.best_ratio_contiguous


def test_search_noisy_curve_rules_disagree_and_notebook_rule_overshoots():
    noisy = {0.2: 90.0, 0.3: 88.5, 0.4: 89.5, 0.5: 80.0}

    def acc(r):
        return noisy.get(r, 90.0 if r < 0.3 else (88.0 if r < 0.4 else 70.0))

    res = search(curve_evaluator(acc), 90.0, sorted(noisy), tolerance=1.0, total=TOTAL, full_curve=True)
    assert res.best_ratio == res.best_ratio_contiguous
    assert res.best_ratio_contiguous < 0.3 <= res.best_ratio_highest
    assert res.best_ratio_highest == 0.4
    assert not res.passed(0.3)


def test_short_curve_stops_each_phase_at_its_first_failure():
    calls = []
    res = search(curve_evaluator(smooth, calls=calls), 90.0, [0.2, 0.3, 0.4, 0.5, 0.6], total=TOTAL)
    # grid: 0.5 fails, 0.6 is never evaluated; refinement 0.41..0.49 stops at 0.47
    assert calls == [0.2, 0.3, 0.4, 0.5, 0.41, 0.42, 0.43, 0.44, 0.45, 0.46, 0.47]
    assert res.best_ratio == res.best_ratio_contiguous == 0.46
    assert res.best_ratio_highest is None and res.to_dict()["best_ratio_highest"] is None
    assert res.to_dict()["full_curve"] is False
    # the notebook's rule needs the whole curve: it never stops early
    highest = search(curve_evaluator(smooth), 90.0, [0.2, 0.3, 0.4, 0.5, 0.6], total=TOTAL, rule="highest")
    assert highest.full_curve and highest.best_ratio_highest == 0.46 and 0.6 in [e.ratio for e in highest.curve]


GRID_STEPS = [round(0.05 * i, 6) for i in range(1, 20)]


@settings(max_examples=400, deadline=None)
@given(
    grid=st.lists(st.sampled_from(GRID_STEPS), min_size=1, max_size=10, unique=True),
    fails=st.sets(st.integers(1, 99)),
    refine_step=st.sampled_from([None, 0.01, 0.02, 0.05, 0.1]),
    known_seed=st.integers(0, 3),
)
def test_property_short_curve_gives_the_full_curves_contiguous_answer(grid, fails, refine_step, known_seed):
    """For any pass/fail curve, stopping each phase at its first failure changes nothing."""

    def evaluate(ratio, budget):
        ok = round(ratio * 100) not in fails
        return Evaluation(ratio, TOTAL if ok else 0, TOTAL, TOTAL)

    full = search(evaluate, 100.0, grid, tolerance=1.0, refine_step=refine_step, full_curve=True)
    full_curve = [(e.ratio, full.passed(e.ratio)) for e in full.curve]
    # some candidates already journalled by an earlier (full) run are reused as they are
    known = {e.ratio: e for i, e in enumerate(full.curve) if (i + known_seed) % 4 == 0}
    calls = []
    short = search(lambda r, b: calls.append(r) or evaluate(r, b), 100.0, grid, tolerance=1.0,
                   refine_step=refine_step, known=known)
    assert short.best_ratio == short.best_ratio_contiguous == pick(full_curve, "contiguous") == full.best_ratio
    assert short.best_ratio_highest is None
    evaluated = [e.ratio for e in short.curve]
    assert set(evaluated) <= {r for r, _ in full_curve} and not set(calls) & set(known)
    # past the answer only failures were evaluated: at most one per phase
    assert sum(r > short.best_ratio for r in evaluated) <= 2


def test_fixed_known_results_are_reused_not_reevaluated():
    calls = []
    ev = curve_evaluator(smooth, calls=calls)
    first = search(ev, 90.0, [0.2, 0.5], total=TOTAL, refine_step=0.1)
    n = len(calls)
    known = {e.ratio: e for e in first.curve}
    again = search(ev, 90.0, [0.2, 0.5], total=TOTAL, refine_step=0.1, known=known)
    assert len(calls) == n and again.best_ratio == first.best_ratio


def test_early_stop_same_answer_fewer_images():
    full = search(curve_evaluator(smooth), 90.0, [0.2, 0.4, 0.6, 0.8], exact=True, total=TOTAL)
    fast = search(curve_evaluator(smooth), 90.0, [0.2, 0.4, 0.6, 0.8], exact=False, total=TOTAL)
    assert fast.best_ratio == full.best_ratio
    assert sum(e.seen for e in fast.curve) < sum(e.seen for e in full.curve)
    stopped = [e for e in fast.curve if e.stopped]
    assert stopped and all(e.acc >= next(f for f in full.curve if f.ratio == e.ratio).acc for e in stopped)


def test_bad_rule_or_tolerance():
    with pytest.raises(ValueError, match="search.rule"):
        search(curve_evaluator(smooth), 90.0, [0.5], rule="nope")
    with pytest.raises(ValueError, match="search.tolerance"):
        search(curve_evaluator(smooth), 90.0, [0.5], tolerance=-0.5)


@settings(max_examples=300, deadline=None)
@given(
    total=st.integers(1, 400),
    threshold=st.floats(0, 100, allow_nan=False),
    seed=st.integers(0, 10_000),
    p=st.floats(0, 1),
    batch=st.integers(1, 64),
)
def test_property_early_stop_never_changes_verdict(total, threshold, seed, p, batch):
    rng = random.Random(seed)
    preds = [rng.random() < p for _ in range(total)]
    full = Evaluation(0.5, sum(preds), total, total)
    budget = max_errors(total, threshold)
    c = seen = 0
    stopped = False
    for i in range(0, total, batch):
        chunk = preds[i:i + batch]
        c += sum(chunk)
        seen += len(chunk)
        if seen - c > budget:
            stopped = True
            break
    early = Evaluation(0.5, c, seen, total, stopped)
    assert verdict(early, threshold) == verdict(full, threshold)
    assert early.acc >= full.acc - 1e-9  # a stopped candidate's figure is an upper bound


@given(total=st.integers(1, 10_000), threshold=st.floats(0, 100, allow_nan=False))
def test_required_correct_is_the_minimum_passing_count(total, threshold):
    c = required_correct(total, threshold)
    if c <= total:
        assert passes(c, total, threshold)
    if c > 0:
        assert not passes(c - 1, total, threshold)


def test_report_renders_a_short_curve_without_the_highest_answer():
    from prunelab.report.markdown import render

    res = search(curve_evaluator(smooth), 90.0, [0.2, 0.4, 0.6], total=TOTAL)
    s = dict(res.to_dict(), scope="global", schedule="oneshot")
    report = {"dense": {}, "pruned": {"ratio": s["best_ratio"]}, "finetune": {"reused": False, "source": None},
              "device": {"name": "cpu"}, "search": s, "timing_s": {}}
    text = render(report, {})
    assert s["best_ratio_highest"] is None and "`highest` (the notebook's rule) is not known" in text


@pytest.mark.parametrize("graph, fused", [(True, True), (False, False)])
def test_report_names_the_deploy_forms_graph_and_fusion(graph, fused):
    from prunelab.report.markdown import render

    res = search(curve_evaluator(smooth), 90.0, [0.2, 0.4], total=TOTAL)
    s = dict(res.to_dict(), scope="global", schedule="oneshot")
    rt = {"runtime": "deploy", "dtype": "bfloat16", "layout": "channels_last", "batch_sizes": [1, 128],
          "graph": graph, "fused_conv_relu": fused, "device": "cuda"}
    report = {"dense": {}, "pruned": {"ratio": s["best_ratio"]}, "finetune": {"reused": False, "source": None},
              "device": {"name": "cuda"}, "search": s, "timing_s": {}, "latency": {"runtime": rt, "batch_size": 128}}
    line = next(x for x in render(report, {}).splitlines() if x.startswith("Latency:"))
    assert line.startswith("Latency: `deploy` runtime, bfloat16, channels_last")
    assert ("CUDA graph" in line) is graph and ("conv+ReLU fused" in line) is fused
