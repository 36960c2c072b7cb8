"""Search across methods: the objective picks the best passing candidate measured by the glue's
timer, and the chained method leaves a 2:4 pattern in a channel-pruned network."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_channel import tiny_vgg
from torch import nn
from torch.utils.data import TensorDataset

from prunelab.pruning.channel import conv_channels
from prunelab.pruning.registry import make_pruner
from prunelab.pruning.semi_structured import eligible, is_two_four
from prunelab.search.across import oneshot_walk, search_across
from prunelab.search.oneshot import OneShotSearch
from prunelab.search.rules import Evaluation

DATA = TensorDataset(torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(1)),
                     torch.randint(0, 10, (48,), generator=torch.Generator().manual_seed(2)))


def make_search(tolerance):
    def make(method):
        return OneShotSearch(tolerance=tolerance, grid=[0.25, 0.5], refine_step=None, method=method,
                             pruner_options={"round_to": 1}, fast_eval=False)
    return make


def across(net, tolerance, objective, measure, dense):
    walk = oneshot_walk(make_search(tolerance), DATA, torch.device("cpu"), dense, None, {})
    return search_across(net, ["magnitude", "channel"], walk, objective, measure)


def fake_timer(calls):
    """p50 falls with the ratio for channel, stays flat for magnitude: the channel 0.5 model is fastest."""
    def measure(method, candidate):
        calls.append((method, sum(conv_channels(candidate).values())))
        width = sum(conv_channels(candidate).values())
        channel = method.startswith("channel")
        return {"p50_ms": float(width) if channel else 200.0, "speedup_beyond_noise": channel}
    return measure


def test_latency_objective_picks_the_fastest_passing_candidate():
    net = tiny_vgg()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    calls = []
    dense = Evaluation(0.0, 5, 48, 48)
    result = across(net, 100.0, "latency", fake_timer(calls), dense)
    assert result.chosen["method"] == "channel" and result.chosen["ratio"] == 0.5
    assert result.chosen["p50_ms"] == min(c["p50_ms"] for c in result.candidates if c["passed"])
    assert len(calls) == 4  # every passing candidate measured once (a tolerance of 100 passes all)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the dense net is untouched
    front = result.pareto
    assert front and all(c["passed"] for c in front)


def test_nothing_faster_beyond_noise_leaves_the_dense_model():
    def noise_only(method, candidate):  # slightly "faster" numbers that the paired timing calls noise
        return {"p50_ms": 99.0 - len(method), "speedup_beyond_noise": False}

    result = across(tiny_vgg(), 100.0, "latency", noise_only, Evaluation(0.0, 5, 48, 48))
    assert result.chosen is None
    # the same candidates under an objective that does not need a speedup still choose one
    result = across(tiny_vgg(), 100.0, "params", noise_only, Evaluation(0.0, 5, 48, 48))
    assert result.chosen is not None


def test_only_passing_candidates_are_measured_and_failing_ones_never_chosen():
    calls = []
    dense = Evaluation(0.0, 48, 48, 48)  # 100% dense: with tolerance 0 every pruned candidate fails
    result = across(tiny_vgg(), 0.0, "latency", fake_timer(calls), dense)
    if not any(c["passed"] for c in result.candidates):
        assert result.chosen is None and calls == []
    else:  # a candidate that matches a perfect dense model passes, and only those were measured
        assert len(calls) == sum(c["passed"] for c in result.candidates)


def test_chain_prunes_channels_then_leaves_every_eligible_layer_two_four():
    net = tiny_vgg()
    widths = sum(conv_channels(net).values())
    pruner = make_pruner("channel+semi_structured", net, round_to=1)
    pruned = pruner.finish(0.5)
    assert sum(conv_channels(pruned).values()) == widths - round(0.5 * widths)
    head = pruned.classifier[6]
    layers = [m for m in pruned.modules() if isinstance(m, nn.Conv2d | nn.Linear) and m is not head]
    assert layers and all(is_two_four(m.weight) for m in layers if eligible(m.weight))
    stats = pruner.stats()
    assert stats["two_four_layers"] and stats["channels_removed"] > 0.4
    assert pruned(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.slow
def test_iterative_schedule_with_an_objective_keeps_the_measured_recovered_model(tmp_path):
    """prune.schedule=iterative with search.objective=params through the pipeline: every method walks
    with recovery and the chosen model is the recovered one that was measured."""
    from conftest import FAST_LEARNER, compose_cfg
    from prunelab.pipeline import run

    cfg = compose_cfg(tmp_path, [*FAST_LEARNER, "prune.schedule=iterative", "prune.recover_epochs=1",
                                 "trainer.limit_train_batches=2", "search.objective=params",
                                 "search.methods=[magnitude,channel]", "search.grid=[0.2,0.4]",
                                 "search.tolerance=100", "search.confidence=0.95", "stages.latency=false"])
    report = run(cfg)
    s = report["search"]
    assert s["schedule"] == "iterative" and s["objective"] == "params"
    # recovered steps are judged like one-shot candidates: paired against dense on the same images
    assert all(c["paired"] is not None and c["paired"]["n"] > 0 for c in s["candidates"])
    chosen = s["chosen"]
    assert chosen is not None and chosen["params"] == min(c["params"] for c in s["candidates"] if c["passed"])
    assert report["pruned"]["method"] == chosen["method"] and report["pruned"]["ratio"] == chosen["ratio"]
    assert report["pruned"]["val_acc"]["value"] == pytest.approx(chosen["val_acc"], abs=1e-6)


def test_a_recovered_candidate_shows_its_accuracy_before_and_after_recovery():
    """The row's val_acc is the recovered model's (what is judged); the accuracy right after pruning
    stands beside it, in the json and in report.md's table."""
    from prunelab.report.markdown import across_section
    from prunelab.search.across import candidate_row
    from prunelab.search.iterative import Step
    from prunelab.search.rules import Evaluation

    step = Step(0.1, before=Evaluation(0.1, 7800, 10000, 10000), after=Evaluation(0.1, 8312, 10000, 10000))
    row = candidate_row("channel", step, threshold=84.0)
    assert row["val_acc"] == pytest.approx(83.12) and row["val_acc_before_recovery"] == pytest.approx(78.0)
    assert not row["passed"]
    plain = candidate_row("channel", Evaluation(0.1, 8312, 10000, 10000), threshold=84.0)
    assert "val_acc_before_recovery" not in plain
    md = "\n".join(across_section({"objective": "latency", "methods": ["channel"], "candidates": [row], "tolerance": 1.0,
                                    "dense_val_acc": 85.0, "threshold": 84.0, "chosen": None}))
    assert "83.12 (78.00 before recovery)" in md


def test_a_step_whose_point_estimate_passes_fails_when_its_paired_bound_does_not():
    import torch

    from prunelab.search.oneshot import pair_with_dense
    from prunelab.search.rules import Evaluation, verdict

    dense = torch.tensor([True] * 850 + [False] * 150)
    # 60 images lost, 55 gained: 84.5% against 85.0%, a point drop of 0.5 within a 1-point tolerance
    hits = dense.clone()
    hits[:60] = False
    hits[850:905] = True
    e = Evaluation(0.1, int(hits.sum()), 1000, 1000)
    assert verdict(e, 84.0)  # the point rule alone passes it
    pair_with_dense(e, dense, hits, confidence=0.95, tolerance=1.0)
    assert e.paired["ci"][1] > 1.0 and e.paired_ok is False and not verdict(e, 84.0)
    loose = Evaluation(0.1, int(hits.sum()), 1000, 1000)
    pair_with_dense(loose, dense, hits, confidence=None, tolerance=1.0)
    assert loose.paired is not None and verdict(loose, 84.0)  # reported, not judged, without confidence


def test_shortlist_ranks_on_own_session_speedup_not_on_p50s_from_other_sessions():
    from prunelab.search.across import shortlist

    rows = [{"method": "channel", "ratio": 0.2, "val_acc": 90.0, "p50_ms": 5.0, "screening_ratio": 1.2},
            # the lowest p50, but timed in a quieter session: only 1.1x its own dense timing
            {"method": "channel", "ratio": 0.3, "val_acc": 89.0, "p50_ms": 4.0, "screening_ratio": 1.1},
            {"method": "channel", "ratio": 0.4, "val_acc": 88.0, "p50_ms": 4.5, "screening_ratio": 1.5},
            {"method": "channel", "ratio": 0.5, "val_acc": 89.5, "p50_ms": 4.5, "screening_ratio": 1.5}]
    assert [r["ratio"] for r in shortlist(rows, 3)] == [0.5, 0.4, 0.2]  # tie on speedup: higher val_acc first
    assert shortlist(rows, 0) == [] and len(shortlist(rows, 10)) == 4


def together_result(p50s: dict, dense=10.0, beyond=True, samples=None):
    """deploy.time_together's shape for a fake final round (constant per-iteration times unless
    ``samples`` says otherwise)."""
    models = {"dense": {"p50": dense, "p90": dense}}
    samples = samples or {name: [p50] * 5 for name, p50 in p50s.items()}
    for name, p50 in p50s.items():
        models[name] = {"p50": p50, "p90": p50, "speedup_p50": dense / p50,
                        "paired_ratio": {"p5": dense / p50 - 0.05, "p50": dense / p50, "p95": dense / p50 + 0.05},
                        "speedup_beyond_noise": beyond}
    return {"models": models, "samples": samples, "batch_size": 4, "iters": 3, "runtime": {"runtime": "deploy"}}


def test_final_round_times_the_shortlist_together_and_its_fastest_wins():
    """Own sessions say channel 0.5 is fastest (fake_timer); timed together, channel 0.25 is: the
    final round's answer stands, and the report records the change."""
    seen = []

    def retime(rows):
        seen.append([(r["method"], r["ratio"]) for r in rows])
        return together_result({f"c{i}": (3.0 if r["ratio"] == 0.25 else 6.0) for i, r in enumerate(rows)})

    walk = oneshot_walk(make_search(100.0), DATA, torch.device("cpu"), Evaluation(0.0, 5, 48, 48), None, {})

    def measure(method, candidate):
        width = float(sum(conv_channels(candidate).values()))  # magnitude: as fast as dense
        return dict(fake_timer([])(method, candidate), speedup=1000.0 / width if method == "channel" else 1.0)

    result = search_across(tiny_vgg(), ["magnitude", "channel"], walk, "latency", measure, retime=retime,
                           final_round=3)
    assert seen == [[("channel", 0.5), ("channel", 0.25)]]  # only those faster than dense, best speedup first
    assert result.chosen["method"] == "channel" and result.chosen["ratio"] == 0.25
    f = result.final_round
    assert f["before"] == {"method": "channel", "ratio": 0.5} and f["chosen"] == {"method": "channel", "ratio": 0.25}
    assert f["changed_choice"] is True and f["dense_p50_ms"] == 10.0
    assert [c["p50_ms"] for c in f["shortlist"]] == [6.0, 3.0]
    assert result.chosen["final_round"]["speedup"] == pytest.approx(10.0 / 3.0)
    assert result.to_dict()["final_round"] is f

    # final_round=1 (or no retime): no final round, the own-session p50 decides
    result = search_across(tiny_vgg(), ["magnitude", "channel"], walk, "latency", measure, retime=retime,
                           final_round=1)
    assert len(seen) == 1 and result.final_round is None and result.chosen["ratio"] == 0.5


def test_final_round_prefers_the_more_accurate_when_the_fastest_is_within_noise():
    from prunelab.search.across import run_final_round

    rows = [{"method": "channel", "ratio": 0.6, "val_acc": 80.0, "p50_ms": 4.0, "screening_ratio": 2.5, "passed": True,
             "screening_beyond_noise": True},
            {"method": "channel", "ratio": 0.4, "val_acc": 85.0, "p50_ms": 5.0, "screening_ratio": 2.0, "passed": True,
             "screening_beyond_noise": True},
            {"method": "channel", "ratio": 0.2, "val_acc": 88.0, "p50_ms": 8.0, "screening_ratio": 1.3, "passed": True,
             "screening_beyond_noise": True}]
    # c0 (0.6) and c1 (0.4) swap places iteration by iteration: within each other's noise; c2 is slower
    noisy = {"c0": [4.0, 5.2, 4.1, 5.3, 4.0], "c1": [5.0, 4.1, 5.1, 4.2, 5.0], "c2": [8.0] * 5}
    chosen, record = run_final_round(rows, 3, lambda short: together_result(
        {"c0": 4.1, "c1": 5.0, "c2": 8.0}, samples=noisy))
    assert chosen["ratio"] == 0.4  # as fast within the noise, 5 points more accurate
    assert record["fastest"] == {"method": "channel", "ratio": 0.6}
    assert record["within_noise_of_fastest"] == [{"method": "channel", "ratio": 0.4}]
    assert rows[2]["final_round"]["vs_fastest_p5"] > 1.0  # 0.2 is slower beyond the noise
    # the same finalists timed cleanly apart: the fastest wins
    chosen, record = run_final_round(rows, 3, lambda short: together_result({"c0": 4.0, "c1": 5.0, "c2": 8.0}))
    assert chosen["ratio"] == 0.6 and record["within_noise_of_fastest"] == []


def test_shortlist_takes_a_candidate_without_a_speedup_figure():
    from prunelab.search.across import shortlist

    rows = [{"ratio": 0.2, "val_acc": 90.0, "screening_ratio": None, "screening_beyond_noise": True},
            {"ratio": 0.4, "val_acc": 89.0, "screening_ratio": 1.4}]
    assert [r["ratio"] for r in shortlist(rows, 2)] == [0.4, 0.2]


def test_final_round_where_nothing_stays_faster_beyond_noise_leaves_the_dense_model():
    walk = oneshot_walk(make_search(100.0), DATA, torch.device("cpu"), Evaluation(0.0, 5, 48, 48), None, {})
    result = search_across(tiny_vgg(), ["channel"], walk, "latency", fake_timer([]),
                           retime=lambda rows: together_result({f"c{i}": 9.9 for i in range(len(rows))}, beyond=False))
    assert result.chosen is None and result.final_round["chosen"] is None
    assert result.final_round["changed_choice"] is True


def params_timer(models, batch, device, warmup, iters, include_transfer=False, precision=None, rotate=False):
    """``time_interleaved`` on a fake clock: each form runs the batch once (so the real forms are
    exercised), then "takes" a time proportional to its parameters, the same every iteration.
    Makes the pipeline's choices deterministic on a machine whose load changes."""
    out = {}
    with torch.inference_mode():
        for name, model in models.items():
            model(batch)
            out[name] = [sum(p.numel() for p in model.parameters()) / 1e5] * iters
    return out


def test_latency_search_through_the_pipeline_quotes_one_speedup_per_model(tmp_path, monkeypatch):
    """search.objective=latency on the CPU, end to end: magnitude is not walked (dense kernels here),
    channel's passing candidates are screened (not called speedups), two ratios that round to the
    same network are one candidate timed once, the shortlist is timed together, and the chosen
    model's final-round speedup, with its paired interval, is the one number the headline, the
    candidates table, report.json and the latency timing quote."""
    from conftest import FAST_LEARNER, compose_cfg
    from prunelab.deploy import timing
    from prunelab.pipeline import run

    monkeypatch.setattr(timing, "time_interleaved", params_timer)

    cfg = compose_cfg(tmp_path, [*FAST_LEARNER, "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                                 "search.objective=latency", "search.methods=[magnitude,channel]",
                                 "search.grid=[0.3,0.301,0.6]", "prune.round_to=64", "search.refine_step=null", "search.tolerance=100",
                                 "latency.iters=4", "latency.agreement_images=64"])
    report = run(cfg)
    s = report["search"]
    assert "magnitude" in s["skipped_methods"] and s["methods"] == ["channel"]
    rows = [c for c in s["candidates"] if c["passed"]]
    assert [c["ratio"] for c in rows] == [0.3, 0.301, 0.6]
    twin = rows[1]  # 0.301 rounds to 0.3's widths: the same network, not timed again
    assert twin["same_as"] == {"method": "channel", "ratio": 0.3} and twin["architecture"] == rows[0]["architecture"]
    assert twin["params"] == rows[0]["params"] and twin["timed"].startswith("the same network")
    timed = [rows[0], rows[2]]
    assert all(c["timed"] == "in turns with dense" for c in timed)
    assert all("screening_ratio" in c for c in rows)
    f = s["final_round"]
    assert [c["ratio"] for c in f["shortlist"]] == [0.6, 0.3] and f["runtime"]["runtime"] == "deploy"
    assert all(c["speedup_beyond_noise"] for c in f["shortlist"]) and f["changed_choice"] is False
    chosen = s["chosen"]
    assert chosen["ratio"] == 0.6 and chosen["params"] == min(c["params"] for c in timed)
    assert f["chosen"] == {"method": chosen["method"], "ratio": chosen["ratio"]}
    fastest = min((c for c in f["shortlist"] if c["speedup_beyond_noise"]), key=lambda c: c["p50_ms"])
    assert chosen["ratio"] == fastest["ratio"] and chosen["final_round"]["p50_ms"] == fastest["p50_ms"]
    assert report["pruned"]["method"] == "channel" and report["pruned"]["ratio"] == chosen["ratio"]
    # the deploy forms' answers were checked on the first 64 validation images (two timed batches of 32)
    assert {a["images"] for a in report["latency"]["agreement"].values()} == {64}
    # one number: the final round's, everywhere
    fr = chosen["final_round"]
    lat, p = report["latency"], report["pruned"]
    assert lat["measured_in"] == "final round of the search"
    assert p["speedup"]["value"] == lat["speedup_p50"] == fr["speedup"] == chosen["speedup"]
    assert p["speedup"]["paired_5_95"] == lat["speedup_paired_5_95"] == fr["paired_ratio_5_95"]
    assert p["speedup"]["verdict"] == "faster" and p["latency_ms"]["p50"] == fr["p50_ms"]
    assert report["dense"]["latency_ms"]["p50"] == f["dense_p50_ms"]
    assert lat["by_batch_size"][str(lat["batch_size"])]["speedup_p50"] == fr["speedup"]
    assert all("speedup" not in c for c in rows if not c.get("final_round"))  # screened only
    out = Path(cfg.paths.output_dir)
    md = (out / "report.md").read_text()
    assert "Final round" in md and "Pareto front" in md and "/64 (0 beyond rounding)" in md
    quoted = f"{fr['speedup']:.2f}x (paired 5-95%"
    head = md.split("## Search across methods")[0]
    assert quoted in head and md.count(quoted) >= 3  # headline, candidates table, final round
    assert [ln for ln in head.splitlines() if ln.startswith("| speed")][0].count("x (paired") == 1
    assert any(out.rglob("*.png"))


def test_same_network_is_one_candidate_left_out_of_the_final_round_and_the_front():
    from prunelab.search.across import mark_same_networks, shortlist

    rows = [{"method": "channel", "ratio": 0.97, "val_acc": 80.0, "p50_ms": 5.0, "screening_ratio": 1.5,
             "architecture": "a", "passed": True},
            {"method": "channel", "ratio": 0.98, "val_acc": 80.0, "p50_ms": 2.0, "screening_ratio": 4.0,
             "architecture": "a", "passed": True},
            {"method": "channel", "ratio": 0.5, "val_acc": 85.0, "p50_ms": 6.0, "screening_ratio": 1.2,
             "architecture": "b", "passed": True}]
    mark_same_networks(rows)
    assert rows[1]["same_as"] == {"method": "channel", "ratio": 0.97} and "same_as" not in rows[0]
    assert [r["ratio"] for r in shortlist(rows, 3)] == [0.97, 0.5]  # the twin's lucky screening counts for nothing


def test_a_stopped_candidates_interval_holds_its_bound_and_the_plot_draws_it(tmp_path):
    from prunelab.report.plots import accuracy_vs_latency
    from prunelab.search.across import candidate_row

    # stopped after 100 of 1,000 images with 20 right: at most 92% over the split, at least 2%
    stopped = Evaluation(0.5, correct=20, seen=100, total=1000, stopped=True, extra={"p50_ms": 3.0})
    row = candidate_row("channel", stopped, threshold=80.0)
    lo, hi = row["val_acc_ci95"]
    assert row["val_acc"] == 92.0 and row["acc_is_bound"] and lo <= 2.0 and hi == 92.0
    full = candidate_row("channel", Evaluation(0.3, correct=900, seen=1000, total=1000, extra={"p50_ms": 4.0}), 80.0)
    assert full["val_acc_ci95"][0] < 90.0 < full["val_acc_ci95"][1] < 92.0
    search = {"methods": ["channel"], "candidates": [row, full], "dense_val_acc": 91.0, "threshold": 90.0}
    out = accuracy_vs_latency(search, {"latency_ms": {"p50": 5.0}}, tmp_path / "a.png")
    assert (tmp_path / "a.png").is_file() and out


@pytest.mark.parametrize("correct,total", [(60, 60), (0, 60), (1, 3), (999, 1000)])
def test_the_wilson_interval_holds_the_observed_share_exactly_at_the_ends(correct, total):
    from prunelab.report.stats import wilson_interval

    lo, hi = wilson_interval(correct, total)
    share = 100.0 * correct / total
    assert lo <= share <= hi
    assert (hi == 100.0) == (correct == total) and (lo == 0.0) == (correct == 0)
