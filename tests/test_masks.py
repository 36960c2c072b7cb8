"""Magnitude masks: exact counts, and the same masks as torch.nn.utils.prune on the same weights."""

import copy

import pytest
import torch
import torch.nn.utils.prune as tprune
from torch import nn

from prunelab.pruning.magnitude import MagnitudePruner, search_ratios
from prunelab.pruning.masks import keep_masks, magnitude_masks, prunable_weights, rank, sparsity


def toy(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 10))


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.33, 0.5, 0.77, 0.95])
def test_global_matches_torch_global_unstructured(ratio):
    model = toy()
    ref = copy.deepcopy(model)
    mods = [(m, "weight") for m in ref.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    tprune.global_unstructured(mods, pruning_method=tprune.L1Unstructured, amount=ratio)
    masks = magnitude_masks(prunable_weights(model), ratio, "global")
    ref_masks = [m.weight_mask.bool() for m, _ in mods]
    for ours, theirs in zip(masks.values(), ref_masks, strict=True):
        assert torch.equal(ours, theirs)
    total = sum(w.numel() for w in prunable_weights(model).values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(ratio * total)


@pytest.mark.parametrize("ratio", [0.1, 0.45, 0.9])
def test_layerwise_matches_torch_l1_unstructured_per_layer(ratio):
    model = toy(1)
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            tprune.l1_unstructured(m, "weight", amount=ratio)
    masks = magnitude_masks(prunable_weights(model), ratio, "layerwise")
    ref_masks = [m.weight_mask.bool() for m in ref.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    for (name, ours), theirs in zip(masks.items(), ref_masks, strict=True):
        assert torch.equal(ours, theirs), name
        n = ours.numel()
        assert int((~ours).sum()) == round(ratio * n)


def test_global_and_layerwise_differ_when_layer_scales_differ():
    model = toy()
    with torch.no_grad():
        w4 = model[4].weight
        w4.copy_(torch.sign(w4) * (1 + w4.abs()))  # every Linear weight above every conv weight
    w = prunable_weights(model)
    g = magnitude_masks(w, 0.4, "global")  # 40% of all weights < the convs' 504 weights
    lw = magnitude_masks(w, 0.4, "layerwise")
    assert g["4"].all() and not lw["4"].all()


def test_ties_still_prune_exact_count():
    w = {"a": torch.tensor([1.0, 1.0, 1.0, 1.0]), "b": torch.tensor([1.0, 2.0, 1.0, 3.0])}
    for ratio, k in [(0.25, 2), (0.5, 4), (0.75, 6)]:
        masks = keep_masks(w, rank(w, [ratio])[ratio])
        assert sum(int((~m).sum()) for m in masks.values()) == k
    masks = keep_masks(w, rank(w, [0.25])[0.25])
    assert masks["a"].tolist() == [False, False, True, True]  # first ties in flat order go first


def test_pruner_restores_between_candidates_and_counts_nonzero():
    model = toy(2)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    p = MagnitudePruner(model, "global")
    p.prepare(search_ratios([0.2, 0.9], 0.1))
    p.apply(0.9)
    high = p.stats()["nonzero"]
    p.apply(0.2)  # going down must revive weights from the pristine copy
    low = p.stats()
    assert low["nonzero"] > high
    total = low["params"]
    assert low["zeros"] == round(0.2 * total)
    p.apply(0.0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k]), k
    # biases are never pruned
    p.finish(0.9)
    assert torch.equal(model[0].bias, original["0.bias"])
    assert not any("weight_orig" in k or "weight_mask" in k for k in model.state_dict())


def test_sparsity_reports_layers_and_fraction():
    model = toy()
    p = MagnitudePruner(model, "layerwise")
    p.finish(0.5)
    s = sparsity(prunable_weights(model))
    assert set(s["layers"]) == {"0", "2", "4"}
    assert abs(s["sparsity"] - 0.5) < 0.01 and s["nonzero"] + s["zeros"] == s["params"]


def test_search_ratios_cover_grid_and_refinement_without_float_noise():
    rs = search_ratios([0.2, 0.3], 0.01)
    assert 0.34 in rs and 0.2 in rs and len(rs) == 99
    assert all(r == round(r, 6) for r in rs)


def tied_toy(seed=0, zeros=True):
    """Integer-valued weights: most magnitudes tie, some are exactly zero."""
    model = toy(seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in prunable_weights(model).values():
            w.copy_(torch.randint(-3 if zeros else 1, 4, w.shape, generator=g).float())
            if not zeros:
                w.mul_(torch.where(torch.rand(w.shape, generator=g) < 0.5, -1.0, 1.0))
    return model


def with_head_floor(keep, w):
    """The head rule spelled out slowly: a row left with no nonzero weight keeps its largest |w|."""
    keep = keep.clone()
    for i in range(w.shape[0]):
        if not (keep[i] & (w[i] != 0)).any() and (w[i] != 0).any():
            keep[i, int(w[i].abs().argmax())] = True
    return keep


@pytest.mark.parametrize("scope", ["global", "layerwise"])
@pytest.mark.parametrize("zeros", [True, False])
def test_pruner_with_ties_and_zeros_counts_exactly_and_matches_masks(scope, zeros, monkeypatch):
    import prunelab.pruning.masks as masks_mod

    model = tied_toy(3, zeros)
    pristine = {k: v.clone() for k, v in prunable_weights(model).items()}
    ratios = [0.05, 0.2, 0.33, 0.5, 0.71, 0.9]
    p = MagnitudePruner(model, scope)
    p.prepare(ratios)
    for chunk in (1 << 23, 7):  # one piece per layer, and many small pieces across the ties
        monkeypatch.setattr(masks_mod, "CHUNK", chunk)
        for r in ratios:
            p.apply(r)
            live = prunable_weights(model)
            stats = p.stats()
            kept_rows = stats.pop("head_rows_kept", 0)
            assert stats == sparsity(live), (r, chunk)  # counts from the cuts == a counting pass
            ref = magnitude_masks(pristine, r, scope)
            groups = [list(ref)] if scope == "global" else [[n] for n in ref]
            for names in groups:
                n = sum(pristine[k].numel() for k in names)
                assert sum(int(torch.count_nonzero(~ref[k])) for k in names) == round(r * n)
            ref = dict(ref, **{"4": with_head_floor(ref["4"], pristine["4"])})
            assert kept_rows == int((ref["4"] & ~magnitude_masks(pristine, r, scope)["4"]).sum()), (r, chunk)
            got = p.keep_masks()
            for name, w in live.items():
                assert torch.equal(got[name], ref[name]), (r, chunk, name)
                assert torch.equal(w, torch.where(ref[name], pristine[name], 0.0)), (r, chunk, name)
    # after finish the masks come from the pruned weights alone, and are the same
    expected = magnitude_masks(pristine, 0.9, scope)
    expected["4"] = with_head_floor(expected["4"], pristine["4"])
    assert not torch.equal(expected["4"], magnitude_masks(pristine, 0.9, scope)["4"])  # the floor is exercised
    p.finish(0.9)
    assert not p._state.original
    for name, m in p.keep_masks().items():
        assert torch.equal(m, expected[name]), name


def test_first_ties_in_flat_order_go_first_across_pieces(monkeypatch):
    import prunelab.pruning.masks as masks_mod

    monkeypatch.setattr(masks_mod, "CHUNK", 3)
    w = {"a": torch.tensor([2.0, 1.0, -1.0, 5.0, 1.0, 1.0, -1.0, 3.0])}
    m = keep_masks(w, rank(w, [0.5], "layerwise")[0.5])["a"]  # prune 4 of the five 1s: all but the last
    assert m.tolist() == [True, False, False, True, False, False, True, True]
    # applying a cut resolves ties from whichever end is nearer: same result both ways
    for ratio, pruned in [(0.125, [1]), (0.375, [1, 2, 4]), (0.5, [1, 2, 4, 5])]:
        p = MagnitudePruner(nn.Linear(8, 1, bias=False), "layerwise")
        with torch.no_grad():
            p.model.weight.copy_(w["a"])
        p.apply(ratio)
        zeroed = [i for i, x in enumerate(p.model.weight.view(-1).tolist()) if x == 0]
        assert zeroed == pruned, ratio


def test_channels_last_weights_mask_like_contiguous():
    model, ref = toy(4), toy(4)
    model = model.to(memory_format=torch.channels_last)
    assert not model[0].weight.is_contiguous()
    for scope in ("global", "layerwise"):
        a, b = MagnitudePruner(model, scope), MagnitudePruner(ref, scope)
        a.apply(0.6)
        b.apply(0.6)
        for (name, x), y in zip(prunable_weights(model).items(), prunable_weights(ref).values(), strict=True):
            assert torch.equal(x, y), name
        assert a.stats() == b.stats()
        a.apply(0.0)
        b.apply(0.0)


def test_split_global_cut_per_layer_sums_to_the_group_count():
    from prunelab.pruning.masks import layer_cuts, split

    model = tied_toy(5)
    w = prunable_weights(model)
    for r in (0.1, 0.4, 0.8):
        group = rank(w, [r], "global")[r]
        per_layer = layer_cuts(w, [r], "global")[0][r]
        assert per_layer == split(w, group)
        assert sum(c.count for c in per_layer.values()) == group.count


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_ties_prune_exactly_the_count(dtype):
    # four entries tie at |w| = 1 and only one of them may go: the "just below 1" threshold must
    # be taken in the weights' dtype, or hardshrink rounds it back to 1 and drops all four.
    m = nn.Linear(8, 1, bias=False).to(dtype)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[2.0, 1.0, -1.0, 5.0, 1.0, 1.0, -1.0, 3.0]]))
    pruner = MagnitudePruner(m, "layerwise")
    pruner.apply(0.125)
    assert int((m.weight == 0).sum()) == 1 == pruner.stats()["zeros"]
    assert m.weight[0, 1] == 0  # the first tied entry in flat order, as torch's pruning picks


def small_head_net():
    """A net whose head weights are the smallest of all (as after a barely trained fine-tune)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        net[8].weight.mul_(1e-3)
    return net


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_magnitude_099_leaves_every_head_row_a_nonzero_weight(scope):
    net = small_head_net()
    pristine = net[8].weight.detach().clone()
    cut = magnitude_masks(prunable_weights(net), 0.99, scope)["8"]
    if scope == "global":
        assert not cut.any()  # torch's global cut alone would empty the whole head
    p = MagnitudePruner(net, scope)
    p.finish(0.99)
    head = net[8].weight
    assert bool((head != 0).any(1).all())  # every class keeps a weight
    for i in range(10):  # ... its largest one, unchanged
        j = int(pristine[i].abs().argmax())
        assert head[i, j] == pristine[i, j]
    assert p.stats()["head_rows_kept"] == int((~cut.any(1)).sum())
    groups = [p.stats()["params"]] if scope == "global" else [w.numel() for w in prunable_weights(net).values()]
    assert p.stats()["zeros"] == sum(round(0.99 * n) for n in groups) - p.stats()["head_rows_kept"]
    assert bool(p.keep_masks()["8"].any(1).all())  # recovery holds the kept weights trainable


def test_magnitude_callback_at_099_keeps_the_head():
    from prunelab.callbacks import MagnitudePruning

    net = small_head_net()
    cb = MagnitudePruning(0.99, scope="global", when="fit_start")
    stats = cb.prune(net)  # a plain module is its own network
    assert bool((net[8].weight != 0).any(1).all()) and stats["head_rows_kept"] == 10
    assert bool(cb.masks["8"].any(1).all())
