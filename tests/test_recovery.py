"""The iterative schedule's bookkeeping, with recovery and evaluation as stand-ins (no training)."""

import pytest
from test_channel import X, convs, tiny_vgg

from prunelab.search.iterative import iterative, iterative_search
from prunelab.search.rules import Evaluation


def no_recovery(net, masks, step=0):
    return net


def fixed_accuracy(correct):
    return lambda net: Evaluation(0.0, correct, 100, 100)


def test_channel_steps_count_removed_channels_against_the_original():
    model = tiny_vgg()  # 104 prunable channels
    opts = {"round_to": 1, "normalize": "mean"}
    net, steps = iterative(model, "channel", [0.25, 0.5], no_recovery, fixed_accuracy(50), opts)
    shares = [s.extra["channels_removed"] for s in steps]
    assert shares == [round(0.25 * 104) / 104, round(0.5 * 104) / 104]
    assert sum(c.out_channels for c in convs(net).values()) == 104 - round(0.5 * 104)
    assert sum(c.out_channels for c in convs(model).values()) == 104  # the original is untouched
    assert net(X).shape == (4, 10)


def test_channel_steps_with_linears_prune_the_hidden_units_through_the_registry():
    model = tiny_vgg()  # 104 prunable channels and 2 x 64 hidden units
    opts = {"round_to": 1, "normalize": "mean", "scope": "layerwise", "linears": True}
    net, steps = iterative(model, "channel", [0.25, 0.5], no_recovery, fixed_accuracy(50), opts)
    assert [s.extra["channels_removed"] for s in steps] == [58 / 232, 116 / 232]
    assert net.classifier[0].out_features == net.classifier[3].out_features == 32
    assert sum(c.out_channels for c in convs(net).values()) == 104 - 52
    assert net(X).shape == (4, 10)


def test_channel_steps_with_a_linears_exponent_compose_to_the_one_shot_widths():
    from prunelab.pruning.channel import ChannelPruner

    model = tiny_vgg()  # 104 prunable channels and 2 x 64 hidden units
    opts = {"round_to": 1, "normalize": "mean", "scope": "layerwise", "linears": 2}
    net, steps = iterative(model, "channel", [0.25, 0.5], no_recovery, fixed_accuracy(50), opts)
    # step 1: convs lose 26, each hidden layer 1 - 0.75^2 of 64 = 28; step 2: the convs' ratio is
    # 26 of the 78 left, so the hidden units keep (2/3)^2 of their 36: 16, as one shot at 0.5 keeps
    assert sum(c.out_channels for c in convs(net).values()) == 104 - 52
    assert net.classifier[0].out_features == net.classifier[3].out_features == 16
    one_shot = ChannelPruner(model, X[:1], round_to=1, scope="layerwise", linears=2).finish(0.5)
    assert one_shot.classifier[0].out_features == one_shot.classifier[3].out_features == 16
    assert [s.extra["channels_removed"] for s in steps] == [(26 + 56) / 232, (52 + 96) / 232]
    assert net(X).shape == (4, 10)


@pytest.mark.parametrize("grid,p", [([0.2, 0.4], 2), ([0.2, 0.4], 3), ([0.15, 0.35, 0.55], 3)])
def test_linears_exponent_steps_reach_the_one_shot_widths_through_the_rounding(grid, p):
    from prunelab.pruning.channel import ChannelPruner

    # round_to=4: each step's conv widths round away from the ratio asked, and a share of what each
    # step left would carry that into the hidden layers (these grids came out 4 units narrower)
    model = tiny_vgg()
    opts = {"round_to": 4, "normalize": "mean", "scope": "layerwise", "linears": p}
    net, _ = iterative(model, "channel", grid, no_recovery, fixed_accuracy(50), opts)
    one_shot = ChannelPruner(model, X[:1], round_to=4, scope="layerwise", linears=p).finish(grid[-1])
    hidden = lambda m: (m.classifier[0].out_features, m.classifier[3].out_features)  # noqa: E731
    assert hidden(net) == hidden(one_shot)


def test_iterative_search_stops_at_the_first_recovered_failure():
    model = tiny_vgg()
    # each step is evaluated right after pruning, then after recovery: 0.2 and 0.4 recover above
    # the threshold, 0.6 does not, so 0.8 is never tried
    seq = iter([10, 60, 10, 58, 10, 20, 10, 70])
    kept, result = iterative_search(model, "magnitude", [0.6, 0.2, 0.8, 0.4], dense_acc=56.0, tolerance=1.0,
                                    recover=no_recovery, options={"scope": "global"},
                                    evaluate=lambda n: Evaluation(0.0, next(seq), 100, 100))
    steps, best = result.curve, result.best_ratio
    assert [s.ratio for s in steps] == [0.2, 0.4, 0.6]  # walked upwards, stopped at the failure
    assert best == 0.4
    zeros = sum(int((p == 0).sum()) for n, p in kept.named_parameters() if n.endswith("weight") and p.dim() > 1)
    total = sum(p.numel() for n, p in kept.named_parameters() if n.endswith("weight") and p.dim() > 1)
    assert abs(zeros / total - 0.4) < 0.01  # the network handed back is the last passing step's
    assert [s.after.correct for s in steps] == [60, 58, 20]


def test_each_recovery_is_told_its_step_so_each_can_have_its_own_budget():
    seen = []

    def recover(net, masks, step):
        seen.append(step)
        return net

    opts = {"round_to": 1, "normalize": "mean"}
    iterative(tiny_vgg(), "channel", [0.2, 0.4, 0.6], recover, fixed_accuracy(50), opts)
    assert seen == [0, 1, 2]


@pytest.mark.parametrize("given, per_step", [
    (2, [2, 2, 2]), (0.25, [0.25, 0.25, 0.25]), ([1, 4], [1, 4, 4]), ([0.5, 0, 3], [0.5, 0, 3]), ([6], [6, 6, 6])])
def test_recover_epochs_is_one_budget_or_one_per_step_with_the_last_repeated(given, per_step):
    from omegaconf import OmegaConf

    from prunelab.pruning.spec import prune_spec

    p = prune_spec(OmegaConf.create({"prune": {"recover_epochs": given}, "model": {"lr": 0.1}}))
    assert [p.recover_epochs_at(i) for i in range(3)] == per_step
