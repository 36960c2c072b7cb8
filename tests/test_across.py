"""Search across methods: the objective picks the best passing candidate measured by the glue's
timer, and the chained method leaves a 2:4 pattern in a channel-pruned network."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from prunelab.pruning.channel import conv_channels
from prunelab.pruning.registry import make_pruner
from prunelab.pruning.semi_structured import eligible, is_two_four
from prunelab.search.across import oneshot_walk, search_across
from prunelab.search.oneshot import OneShotSearch
from prunelab.search.rules import Evaluation
from test_channel import tiny_vgg

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
                                 "search.tolerance=100", "stages.latency=false"])
    report = run(cfg)
    s = report["search"]
    assert s["schedule"] == "iterative" and s["objective"] == "params"
    chosen = s["chosen"]
    assert chosen is not None and chosen["params"] == min(c["params"] for c in s["candidates"] if c["passed"])
    assert report["pruned"]["method"] == chosen["method"] and report["pruned"]["ratio"] == chosen["ratio"]
    assert report["pruned"]["val_acc"]["value"] == pytest.approx(chosen["val_acc"], abs=1e-6)
