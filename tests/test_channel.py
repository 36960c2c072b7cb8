"""Channel pruning: exact removal of the lowest-ranked filters, floors, MACs, compact save/load."""

import copy

import pytest
import torch
import torchvision
from torch import nn

from prunelab.pruning.channel import (
    ChannelPruner,
    ChannelRanking,
    channel_plan,
    filter_importance,
    prunable_convs,
    prune_channels,
)
from prunelab.pruning.channel_files import load_channel_pruned, save_channel_pruned
from prunelab.pruning.costs import count_macs


def tiny_vgg(batch_norm=False, seed=0):
    """torchvision's VGG class with vgg16's module names, small enough for 32x32 CPU tests.

    torchvision hard-codes Linear(512*7*7, 4096) in ``VGG.__init__``, so the classifier is
    rebuilt to fit the 32 channels of these features (same indices 0/3/6 as vgg16).
    """
    torch.manual_seed(seed)
    cfg = [8, "M", 16, "M", 16, "M", 32, "M", 32, "M"]
    m = torchvision.models.VGG(features=torchvision.models.vgg.make_layers(cfg, batch_norm=batch_norm),
                               num_classes=10, init_weights=True)
    m.classifier = nn.Sequential(nn.Linear(32 * 49, 64), nn.ReLU(True), nn.Dropout(), nn.Linear(64, 64),
                                 nn.ReLU(True), nn.Dropout(), nn.Linear(64, 10))
    if batch_norm:  # non-trivial BN statistics, so a wrong BN slice shows in the outputs
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.data.uniform_(0.5, 1.5)
                mod.bias.data.uniform_(-0.2, 0.2)
    return m.eval()


X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def convs(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def masked_dense(model, plan):
    """The original with the removed filters, their biases (and BN affine) zeroed."""
    ref = copy.deepcopy(model)
    mods = dict(ref.named_modules())
    names = list(mods)
    with torch.no_grad():
        for name, idxs in plan.items():
            conv = mods[name]
            conv.weight[idxs] = 0
            conv.bias[idxs] = 0
            nxt = mods[names[names.index(name) + 1]]
            if isinstance(nxt, nn.BatchNorm2d):  # BN(0) = beta - mean*gamma/std; zero gamma and beta too
                nxt.weight[idxs] = 0
                nxt.bias[idxs] = 0
    return ref


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.8])
def test_pruned_equals_masked_dense(batch_norm, ratio):
    model = tiny_vgg(batch_norm)
    plan = channel_plan(model, ratio, normalize="none", round_to=1)  # the exact global ranking
    pruned = prune_channels(model, plan, X[:1])
    with torch.no_grad():
        out = pruned(X)
        ref = masked_dense(model, plan)(X)
    assert out.shape == (4, 10)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    assert sum(len(v) for v in plan.values()) == round(ratio * sum(c.out_channels for c in convs(model).values()))


def test_layerwise_takes_the_same_share_of_every_layer_its_own_lowest():
    model = tiny_vgg()
    # one layer's filters made far weaker than the rest: a global ranking empties it first
    with torch.no_grad():
        convs(model)["features.3"].weight.mul_(1e-3)
    scores = {n: filter_importance(c) for n, c in convs(model).items()}
    glob = channel_plan(model, 0.25, normalize="none", round_to=1)
    assert len(glob["features.3"]) == 15  # emptied to its floor (one of 16 kept)
    plan = channel_plan(model, 0.25, normalize="none", round_to=1, scope="layerwise")
    for name, s in scores.items():
        assert len(plan[name]) == round(0.25 * s.numel())
        assert plan[name] == sorted(torch.argsort(s, stable=True)[: len(plan[name])].tolist())
    pruner = ChannelPruner(model, X[:1], normalize="none", round_to=1, scope="layerwise")
    assert pruner.plan(0.25) == plan
    with pytest.raises(ValueError, match="scope must be global or layerwise"):
        channel_plan(model, 0.25, scope="per-layer")


def test_removes_exactly_the_lowest_ranked_and_keeps_original_rows():
    model = tiny_vgg()
    before = copy.deepcopy(model.state_dict())
    plan = channel_plan(model, 0.4, normalize="none", round_to=1)
    pruned = prune_channels(model, plan, X[:1])
    scores = {n: filter_importance(c) for n, c in convs(model).items()}
    removed = torch.cat([scores[n][idxs] for n, idxs in plan.items()])
    # a layer at its floor (1 channel left) may keep a low filter; every other kept one outranks all removed
    kept = torch.cat([s[[i for i in range(s.numel()) if i not in set(plan[n])]] for n, s in scores.items()
                      if s.numel() - len(plan[n]) > 1])
    assert removed.max() <= kept.min()
    new = convs(pruned)
    names = list(new)
    for i, (name, old) in enumerate(convs(model).items()):
        keep_out = [c for c in range(old.out_channels) if c not in set(plan[name])]
        keep_in = list(range(old.in_channels)) if i == 0 else \
            [c for c in range(old.in_channels) if c not in set(plan[names[i - 1]])]
        assert torch.equal(new[name].weight, old.weight[keep_out][:, keep_in])
        assert torch.equal(new[name].bias, old.bias[keep_out])
    # classifier[0] loses the 49 consecutive inputs of each removed channel of the last conv
    last = names[-1]
    cols = [c * 49 + j for c in range(32) if c not in set(plan[last]) for j in range(49)]
    assert torch.equal(pruned.classifier[0].weight, model.classifier[0].weight[:, cols])
    # the original is untouched, and the head is not pruned
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert torch.equal(pruned.classifier[6].weight, model.classifier[6].weight)
    assert torch.equal(pruned.classifier[3].weight, model.classifier[3].weight)


def test_l2_ranking_and_bad_importance():
    model = tiny_vgg()
    conv = model.features[0]
    assert torch.allclose(filter_importance(conv, "l2"), conv.weight.flatten(1).norm(dim=1))
    with pytest.raises(ValueError, match="importance must be one of"):
        channel_plan(model, 0.5, importance="l3")


@pytest.mark.parametrize("min_channels", [1, 3])
def test_floor_holds_at_high_ratio(min_channels):
    model = tiny_vgg()
    plan = channel_plan(model, 0.99, min_channels=min_channels, normalize="none", round_to=1)
    pruned = prune_channels(model, plan, X[:1])
    for name, conv in convs(pruned).items():
        assert conv.out_channels == min_channels, name
    assert pruned(X).shape == (4, 10)


def test_ranking_ties_and_floor_skip_to_next_lowest():
    ranking = ChannelRanking({"a": torch.tensor([0.1, 0.2]), "b": torch.tensor([0.3, 0.05, 0.4])})
    # lowest three: b1, a0, a1 -> a hits its floor of 1, so b0 is next
    assert ranking.plan(0.6) == {"a": [0], "b": [0, 1]}
    assert ranking.plan(0.0) == {"a": [], "b": []}


def test_round_to_keeps_multiples_and_drops_each_layers_lowest():
    g = torch.Generator().manual_seed(3)
    scores = {"a": torch.rand(64, generator=g), "b": torch.rand(40, generator=g), "c": torch.rand(6, generator=g)}
    ranking = ChannelRanking(scores)
    exact = ranking.plan(0.37)
    rounded = ranking.plan(0.37, round_to=8)
    for name, s in scores.items():
        n = s.numel()
        kept = n - len(rounded[name])
        if n > 8:
            assert kept % 8 == 0 and kept >= 8, (name, kept)
            # the nearest multiple of 8 to what the global ranking left this layer
            assert abs(kept - (n - len(exact[name]))) <= 4, name
        else:  # a layer no wider than round_to is left as the global ranking had it
            assert rounded[name] == exact[name]
        # whatever goes is the layer's own lowest-scored channels
        assert rounded[name] == sorted(torch.argsort(s, stable=True)[: len(rounded[name])].tolist()), name


def test_round_to_leaves_untouched_layers_whole():
    # widths 20 and 36 are not multiples of 8; at ratio 0 (and where the ranking removes nothing
    # from a layer) rounding must not take channels away
    ranking = ChannelRanking({"a": torch.arange(20.0), "b": torch.arange(100.0, 136.0)})
    assert ranking.plan(0.0, round_to=8) == {"a": [], "b": []}
    plan = ranking.plan(10 / 56, round_to=8)  # the 10 lowest are all in "a"
    assert plan["b"] == [] and len(plan["a"]) == 20 - 8


def test_round_to_respects_floor_and_reports_removed_share():
    model = tiny_vgg()  # conv widths 8, 16, 16, 32, 32
    pruner = ChannelPruner(model, X, min_channels=1, round_to=8)
    pruned = pruner.finish(0.9)
    widths = [c.out_channels for c in convs(pruned).values()]
    exact = [c.out_channels for c in convs(prune_channels(model, channel_plan(model, 0.9, normalize="mean", round_to=1), X[:1])).values()]
    # the 8-wide layer keeps what the global ranking gave it; the wider ones stop at one multiple of 8
    assert widths == [exact[0], 8, 8, 8, 8] and exact[1:] != widths[1:]
    stats = pruner.stats()
    assert stats["channels_removed"] == pytest.approx((104 - sum(widths)) / 104)
    assert pruned(X).shape == (4, 10)
    with pytest.raises(ValueError, match="round_to"):
        ChannelPruner(model, X, round_to=0)


def test_channel_pruner_interface_and_stats():
    model = tiny_vgg()
    pruner = ChannelPruner(model, X, importance="l1", min_channels=1, round_to=1)
    pruner.prepare([0.25, 0.5])
    dense = pruner.stats()
    small = pruner.apply(0.5)
    stats = pruner.stats()
    assert small is not model and pruner.apply(0.25) is not small
    stats25 = pruner.stats()
    assert dense["params"] > stats25["params"] > stats["params"]
    assert dense["macs"] == count_macs(model, X) > stats["macs"]
    assert sum(stats["channels"].values()) == sum(dense["channels"].values()) - round(0.5 * 104)
    assert 0 < stats["sparsity"] < 1 and stats["nonzero"] < dense["nonzero"]
    assert set(stats["layers"]) == set(dense["layers"])
    final = pruner.finish(0.5)
    assert pruner.stats()["channels"] == stats["channels"]
    assert torch.equal(final(X), small(X))


def test_count_macs_by_hand():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    x = torch.randn(2, 3, 8, 8)
    assert count_macs(net, x) == 4 * 8 * 8 * 3 * 9 + 256 * 5


def test_resnet18_prunes_only_independent_convs():
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    names = list(prunable_convs(model, x))
    assert names == [f"layer{i}.{j}.conv1" for i in range(1, 5) for j in range(2)]
    pruned = prune_channels(model, channel_plan(model, 0.3, example_input=x, normalize="none", round_to=1), x)
    assert pruned(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="tied"):
        prune_channels(model, {"layer1.0.conv2": [0]}, x)


@pytest.mark.parametrize("arch", ["vgg16", "vgg16_bn"])
def test_save_load_roundtrip(tmp_path, arch):
    model = torchvision.models.get_model(arch, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    pruned = prune_channels(model, channel_plan(model, 0.9, example_input=x[:1], normalize="none", round_to=1), x[:1])
    del model
    save_channel_pruned(pruned, tmp_path, arch=arch, num_classes=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned.safetensors", "pruned_channels.json"]
    loaded = load_channel_pruned(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    assert loaded.classifier[0].in_features == pruned.classifier[0].in_features < 512 * 49
    with pytest.raises(FileNotFoundError, match="pruned_channels.json"):
        load_channel_pruned(tmp_path / "nowhere")


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_linears_remove_hidden_units_exactly_and_leave_the_classes(scope):
    model = tiny_vgg()
    without = channel_plan(model, 0.5, normalize="none", round_to=1, scope=scope)
    assert not any(n.startswith("classifier") for n in without)
    plan = channel_plan(model, 0.5, normalize="mean", round_to=1, scope=scope, linears=True)
    assert {"classifier.0", "classifier.3"} <= set(plan) and "classifier.6" not in plan
    if scope == "layerwise":  # the same share of each hidden layer, its own weakest rows
        for name in ("classifier.0", "classifier.3"):
            rows = filter_importance(model.get_submodule(name))
            assert plan[name] == sorted(torch.argsort(rows, stable=True)[:32].tolist())
    pruned = prune_channels(model, plan, X[:1])
    kept = {n: 64 - len(plan[n]) for n in ("classifier.0", "classifier.3")}
    assert pruned.classifier[0].out_features == kept["classifier.0"] == pruned.classifier[3].in_features
    assert pruned.classifier[6].in_features == kept["classifier.3"] and pruned.classifier[6].out_features == 10
    with torch.no_grad():  # a zeroed row and bias feed ReLU a zero: removing the unit is exact
        assert torch.allclose(pruned(X), masked_dense(model, plan)(X), atol=1e-5)
    with pytest.raises(ValueError, match="classification head"):
        prune_channels(model, {"classifier.6": [0]}, X[:1])


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_linears_exponent_gives_the_hidden_units_their_own_share(scope):
    model = tiny_vgg()  # 104 prunable conv channels, two hidden layers of 64 units
    without = channel_plan(model, 0.5, normalize="mean", round_to=1, scope=scope)
    plan = channel_plan(model, 0.5, normalize="mean", round_to=1, scope=scope, linears=2)
    # the convs are cut as if the hidden units were not there: the ratio counts them alone
    assert {n: plan[n] for n in without} == without
    assert sum(map(len, without.values())) == 52
    for name in ("classifier.0", "classifier.3"):  # each keeps (1 - 0.5) ** 2 of its own units
        rows = filter_importance(model.get_submodule(name))
        assert plan[name] == sorted(torch.argsort(rows, stable=True)[:48].tolist())
    assert "classifier.6" not in plan
    spared = channel_plan(model, 0.5, normalize="mean", round_to=1, scope=scope, linears=0.5)
    assert len(spared["classifier.0"]) == round((1 - 0.5**0.5) * 64) == 19  # p < 1 spares them
    for bad in (0, -1.0, float("nan"), "2"):
        with pytest.raises(ValueError, match="prune.linears must be true, false or a number > 0"):
            ChannelPruner(model, X[:1], linears=bad)


def test_linears_count_in_the_stats_and_the_iterative_steps():
    from prunelab.pruning.width_steps import WidthSteps

    model = tiny_vgg()
    pruner = ChannelPruner(model, X[:1], round_to=1, scope="layerwise", linears=True)
    pruner.finish(0.25)
    stats = pruner.stats()
    assert stats["channels"]["classifier.0"] == stats["channels"]["classifier.3"] == 48
    assert "classifier.6" not in stats["channels"]
    assert stats["channels_removed"] == pytest.approx(0.25, abs=0.01)  # of 104 conv channels and 128 units
    from prunelab.pruning.channel import channel_stats  # as the report measures the saved model: the same
    assert channel_stats(pruner.current, model)["channels_removed"] == stats["channels_removed"]
    convs_only = ChannelPruner(model, X[:1], round_to=1, scope="layerwise").finish(0.25)
    assert channel_stats(convs_only, model)["channels_removed"] == 26 / 104
    rule = WidthSteps(linears=True)
    start = rule.start(model)
    assert start == {**{n: c.out_channels for n, c in convs(model).items()}, "classifier.0": 64, "classifier.3": 64}
    # a quarter of 232 gone: half of the original needs 58 more of the 174 left
    assert rule.ratio(pruner.current, 0.5, start) == pytest.approx((116 - 58) / 174)
    assert WidthSteps().start(model) == {n: c.out_channels for n, c in convs(model).items()}


def test_resnet18_has_no_hidden_linear_to_prune():
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    assert list(prunable_convs(model, x, linears=True)) == list(prunable_convs(model, x))


def test_save_load_roundtrip_with_hidden_units_removed(tmp_path):
    model = tiny_vgg()
    pruned = ChannelPruner(model, X[:1], round_to=8, scope="layerwise", linears=True).finish(0.5)
    assert pruned.classifier[3].out_features == 32
    import torchvision.models.vgg as vgg

    real = torchvision.models.vgg16(num_classes=10).eval()  # the loader rebuilds torchvision's vgg16
    small = ChannelPruner(real, torch.zeros(1, 3, 32, 32), round_to=16, scope="layerwise", linears=True).finish(0.5)
    assert isinstance(small, vgg.VGG) and small.classifier[0].out_features == small.classifier[3].out_features == 2048
    save_channel_pruned(small, tmp_path, arch="vgg16", num_classes=10)
    loaded = load_channel_pruned(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
