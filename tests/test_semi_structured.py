"""2:4 sparsity: exact pattern, greedy layer choice within the ratio, head untouched, kernel fallback."""

import pytest
import torch
from torch import nn

from prunelab.pruning.masks import prunable_weights
from prunelab.pruning.semi_structured import (
    SemiStructuredPruner,
    eligible,
    is_two_four,
    relative_loss,
    to_sparse_kernels,
    two_four_mask,
)


def net(seed=0):
    """First conv ineligible (3*3*3 = 27 inputs per filter), like VGG's."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10),
    )


@pytest.mark.parametrize("shape", [(16, 32), (6, 8, 3, 3), (5, 4, 1, 1)])
def test_two_zeros_in_every_group_of_four(shape):
    w = torch.randn(shape)
    keep = two_four_mask(w)
    assert keep.shape == w.shape and keep.dtype == torch.bool
    groups = keep.reshape(shape[0], -1, 4)
    assert (groups.sum(-1) == 2).all()
    # the survivors are the two largest magnitudes of each group
    a = w.abs().reshape(shape[0], -1, 4)
    assert (a.masked_fill(~groups, float("inf")).amin(-1) >= a.masked_fill(groups, -1.0).amax(-1)).all()
    assert is_two_four(w * keep) and not is_two_four(w)


def test_ties_still_keep_exactly_two_and_ineligible_raises():
    assert (two_four_mask(torch.ones(3, 8)).reshape(3, 2, 4).sum(-1) == 2).all()
    assert not eligible(torch.randn(8, 3, 3, 3))
    with pytest.raises(ValueError, match="27"):
        two_four_mask(torch.randn(8, 3, 3, 3))


def test_relative_loss():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert relative_loss(w, two_four_mask(w)) == pytest.approx(3 / 10)


@pytest.mark.parametrize("ratio", [0.0, 0.01, 0.05, 0.2, 0.3, 0.45, 0.5, 0.9])
def test_greedy_respects_ratio_and_is_nested(ratio):
    model = net()
    head = model[9].weight.detach().clone()
    first = model[0].weight.detach().clone()
    pruner = SemiStructuredPruner(model)
    pruner.prepare([ratio])
    pruner.apply(ratio)
    stats = pruner.stats()
    assert stats["sparsity"] <= ratio + 1e-12
    for name in stats["two_four_layers"]:
        assert is_two_four(prunable_weights(model)[name])
    assert torch.equal(model[9].weight, head) and "9" not in stats["two_four_layers"]
    assert torch.equal(model[0].weight, first)  # ineligible: never touched
    # layers are taken cheapest first, and a lower ratio's layers are a prefix of a higher one's
    losses = [relative_loss(pruner._state.original[n], two_four_mask(pruner._state.original[n]))
              for n in stats["two_four_layers"]]
    assert losses == sorted(losses)
    assert pruner.layers_for(ratio) == pruner.layers_for(min(1.0, ratio + 0.1))[: len(stats["two_four_layers"])]


def test_half_ratio_converts_every_eligible_layer_and_restores():
    model = net()
    original = {n: w.detach().clone() for n, w in prunable_weights(model).items()}
    pruner = SemiStructuredPruner(model)
    pruner.apply(0.5)
    assert sorted(pruner.stats()["two_four_layers"]) == ["2", "5", "7"]
    pruner.apply(0.0)
    for n, w in prunable_weights(model).items():
        assert torch.equal(w, original[n])
    out = pruner.finish(0.5)
    assert out is model and is_two_four(model[5].weight)
    assert pruner.stats()["nonzero"] == sum(w.numel() for w in original.values()) - (8 * 72 + 64 * 512 + 32 * 64) // 2


def test_sparse_kernels_fall_back_without_cuda():
    model = net()
    SemiStructuredPruner(model).finish(0.5)
    out, used, reason = to_sparse_kernels(model)
    assert out is model and not used
    assert "no CUDA device of compute capability >= 8.0" in reason and "masked-dense" in reason
    assert model[5].weight.dtype == torch.float32
    with pytest.raises(ValueError):
        to_sparse_kernels(model, dtype=torch.float32)


@pytest.mark.gpu
def test_sparse_kernels_on_ampere_or_newer():
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("needs compute capability >= 8.0")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)).cuda()
    SemiStructuredPruner(model).finish(0.5)
    x = torch.randn(64, 128, device="cuda")
    want = model.half()(x.half()).float()
    out, used, reason = to_sparse_kernels(model, torch.float16)
    assert used, reason
    assert torch.allclose(out(x.half()).float(), want, atol=1e-2, rtol=1e-2)


def test_a_ratio_beyond_reach_reports_what_was_reached_and_why():
    from prunelab.report.markdown import summary_rows

    pruner = SemiStructuredPruner(net())
    pruner.apply(0.7)
    st = pruner.stats()
    assert st["sparsity"] < 0.5 and "the most 2:4 reaches here" in st["shortfall"]
    pruner.apply(0.1)  # between two layers: the next one would overshoot
    assert "would have passed 0.10" in pruner.stats()["shortfall"]
    pruner.apply(0.5)
    assert "shortfall" not in pruner.stats() or pruner.stats()["sparsity"] < 0.495
    pruner.finish(0.7)
    assert "shortfall" in pruner.stats()  # still said once the pristine copy is gone
    report = {"dense": {}, "pruned": {"ratio": 0.7, "ratio_reached": st["sparsity"]}}
    assert summary_rows(report)[0][2] == f"0.70 asked, {st['sparsity']:.3f} reached"
