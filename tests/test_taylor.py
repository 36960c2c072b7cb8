"""prune.importance=taylor: each filter's (sum of weight x gradient)^2 summed over the calibration
batches (the training split's first images, unaugmented), ranking what the data need rather than
what is large; through the pruner, the callbacks and the pipeline, whose search journal resumes."""

import copy

import pytest
import torch
from PIL import Image
from test_channel import X, tiny_vgg
from test_methods import QUICK
from torch import nn

from conftest import compose_cfg
from prunelab.data import SyntheticDataModule
from prunelab.data.transforms import eval_transform
from prunelab.pruning.channel import ChannelPruner, channel_plan, prunable_convs
from prunelab.pruning.taylor import Calibration, journal_options, taylor_scores, with_calibration

Y = torch.tensor([0, 3, 5, 9])


def _by_hand(model: nn.Module, x: torch.Tensor, y: torch.Tensor, name: str) -> torch.Tensor:
    m = copy.deepcopy(model).eval()
    loss = nn.functional.cross_entropy(m(x), y)
    conv = m.get_submodule(name)
    gw, gb = torch.autograd.grad(loss, [conv.weight, conv.bias])
    return ((gw * conv.weight).sum((1, 2, 3)) + gb * conv.bias).detach().pow(2)


def test_scores_are_the_squared_first_order_terms_summed_over_batches():
    model = tiny_vgg()
    convs = prunable_convs(model)
    batches = [(X[:2], Y[:2]), (X[2:], Y[2:])]
    scores = taylor_scores(model, convs, batches)
    for name in ("features.0", "features.9"):
        expected = sum(_by_hand(model, x, y, name) for x, y in batches)  # a sum of squares, not a square of sums
        assert torch.allclose(scores[name], expected, rtol=1e-4, atol=1e-12), name
    assert set(scores) == set(convs) and all(s.shape == (c.out_channels,) for s, c in zip(
        scores.values(), convs.values(), strict=True))


def test_model_flags_and_gradients_are_left_as_they_were():
    model = tiny_vgg().train()
    model.features[0].weight.requires_grad_(False)
    marker = torch.ones_like(model.classifier[0].weight)
    model.classifier[0].weight.grad = marker
    taylor_scores(model, prunable_convs(model), [(X, Y)])
    assert model.training and not model.features[0].weight.requires_grad
    assert model.classifier[0].weight.grad is marker and model.features[3].weight.grad is None


def test_a_large_filter_the_network_ignores_goes_first_where_a_norm_keeps_it():
    model = tiny_vgg()
    with torch.no_grad():
        model.features[0].weight[2] *= 50  # the largest filter of the first conv by far...
        model.features[3].weight[:, 2] = 0  # ...whose output the next conv never reads
    calib = Calibration([(X, Y)])
    l1 = channel_plan(model, 0.125, normalize="none", round_to=1, scope="layerwise")
    taylor = channel_plan(model, 0.125, importance="taylor", normalize="none", round_to=1, scope="layerwise",
                          calibration=calib)
    assert 2 not in l1["features.0"]
    assert taylor["features.0"] == [2]  # one of 8 filters: the one whose removal costs nothing


def test_the_pruner_needs_calibration_and_scores_each_set_of_weights_once(monkeypatch):
    import prunelab.pruning.taylor as taylor

    model = tiny_vgg()
    with pytest.raises(ValueError, match=r"prune.importance=taylor .*calibration="):
        ChannelPruner(model, X[:1], importance="taylor")
    calls = []
    real = taylor.taylor_scores
    monkeypatch.setattr(taylor, "taylor_scores", lambda *a: calls.append(a[0]) or real(*a))
    calib = Calibration([(X, Y)])
    a = ChannelPruner(model, X[:1], importance="taylor", round_to=1, calibration=calib).plan(0.3)
    # the same weights in another layout (a search evaluates channels-last candidates, then saves and
    # times contiguous ones): the scores are reused, not summed again in another order
    nhwc = copy.deepcopy(model).to(memory_format=torch.channels_last)
    b = ChannelPruner(nhwc, X[:1], importance="taylor", round_to=1, calibration=calib).plan(0.3)
    assert a == b and sum(map(len, a.values())) > 0 and len(calls) == 1
    other = tiny_vgg(seed=1)  # other weights: scored afresh
    ChannelPruner(other, X[:1], importance="taylor", round_to=1, calibration=calib).plan(0.3)
    assert len(calls) == 2 and calls[1] is other
    with pytest.raises(ValueError, match="at least one batch"):
        Calibration([])


def test_calibration_is_drawn_only_when_a_ranking_needs_it_and_its_identity_holds_the_images():
    drawn = []

    def draw():
        drawn.append(1)
        return [(X, Y)]

    calib = Calibration(draw=draw)
    assert drawn == [] and "not drawn" in repr(calib)
    ident = calib.identity()
    assert drawn == [1] and ident["images"] == 4
    assert Calibration([(X, Y)]).identity() == ident
    assert Calibration([(X.flip(0), Y)]).identity()["digest"] != ident["digest"]
    assert journal_options({"importance": "l1", "round_to": 16, "calibration_batches": 8}) == {
        "importance": "l1", "round_to": 16}
    assert journal_options({"importance": "taylor", "calibration_batches": 8, "calibration": calib}) == {
        "importance": "taylor", "calibration": ident}
    with pytest.raises(ValueError, match="one of the two"):
        Calibration()


def test_the_pruning_callback_ranks_on_the_trainers_training_images(tmp_path, monkeypatch):
    import lightning as L

    import prunelab.pruning.taylor as taylor
    from prunelab.callbacks import PruningCallback
    from prunelab.models import ImageClassifier

    seen = []
    real = taylor.taylor_scores
    monkeypatch.setattr(taylor, "taylor_scores", lambda m, c, b: seen.append(len(b)) or real(m, c, b))
    dm = SyntheticDataModule(train_size=64, test_size=8, batch_size=16, num_workers=0)
    module = ImageClassifier("resnet18", None, lr=0.05)
    cb = PruningCallback(0.5, method="channel", when="fit_start", round_to=1, importance="taylor",
                         calibration_batches=2)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", callbacks=[cb], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        limit_val_batches=0, limit_train_batches=1)
    trainer.fit(module, datamodule=dm)
    assert seen == [2]  # two batches of the trainer's data module
    with pytest.raises(ValueError, match="needs training images"):
        PruningCallback(0.5, method="channel", importance="taylor").prune(ImageClassifier("resnet18", None))


def test_calibration_is_the_training_splits_first_images_unaugmented():
    dm = SyntheticDataModule(train_size=300, test_size=20, batch_size=16)
    calib = Calibration.from_datamodule(dm, batches=2)
    assert len(calib.batches) == 2 and calib.images == 32
    x_train, y_train = dm._arrays[0], dm._arrays[1]
    first = dm.train_indices[:32]
    assert not set(first) & set(dm.val_indices)
    x = torch.cat([b[0] for b in calib.batches])
    y = torch.cat([b[1] for b in calib.batches])
    expected = torch.stack([eval_transform()(Image.fromarray(x_train[i])) for i in first])
    assert torch.equal(x, expected) and y.tolist() == [int(y_train[i]) for i in first]
    again = Calibration.from_datamodule(dm, batches=2)  # the same images every time
    assert all(torch.equal(a[0], b[0]) for a, b in zip(calib.batches, again.batches, strict=True))


def test_with_calibration_adds_images_only_for_taylor():
    dm = SyntheticDataModule(train_size=300, test_size=20, batch_size=16)
    assert with_calibration({"importance": "l1"}, dm) == {"importance": "l1"}
    opts = with_calibration({"importance": "taylor", "calibration_batches": 3}, dm)
    assert opts["calibration"].images == 48
    with pytest.raises(ValueError, match="needs training images"):
        with_calibration({"importance": "taylor"}, None)


def test_taylor_search_runs_through_the_pipeline_and_its_journal_resumes(tmp_path, monkeypatch):
    import prunelab.pruning.taylor as taylor
    from prunelab.pipeline import run

    batches = []
    real = taylor.taylor_scores
    monkeypatch.setattr(taylor, "taylor_scores", lambda m, c, b: batches.append([len(y) for _, y in b]) or real(m, c, b))
    over = QUICK + ["prune.method=channel", "prune.importance=taylor", "prune.calibration_batches=2",
                    "search.grid=[0.2,0.4]", "search.refine_step=null", "search.full_curve=true",
                    "stages.latency=false", "search.allow_weak_model=true"]
    first = run(compose_cfg(tmp_path, over))["search"]
    assert [c["ratio"] for c in first["curve"]] == [0.2, 0.4] and first["resumed_candidates"] == 0
    # scored once, on two training batches, though the walk and the final model both rank the network
    assert len(batches) == 1 and len(batches[0]) == 2
    again = run(compose_cfg(tmp_path, over))["search"]
    assert again["resumed_candidates"] == 2  # same images, same identity: the journal's verdicts stand
    assert [c["correct"] for c in again["curve"]] == [c["correct"] for c in first["curve"]]


def test_channel_costs_count_a_filters_own_and_its_readers_multiply_adds():
    from prunelab.pruning.channel import build_graph, default_example
    from prunelab.pruning.costs import channel_costs

    model = tiny_vgg()  # convs 3->8 at 32x32, 8->16 at 16x16, 16->16 at 8x8, 16->32 at 4x4, 32->32 at 2x2
    graph = build_graph(model, default_example(model))
    costs = channel_costs(model, graph, prunable_convs(model, graph=graph), default_example(model))
    assert costs["features.0"] == 32 * 32 * 3 * 9 + 16 * 16 * 16 * 9  # its own, plus its input channel of features.3
    assert costs["features.3"] == 16 * 16 * 8 * 9 + 8 * 8 * 16 * 9
    # the 49 pooled copies it feeds classifier[0] are one input in the served (folded) form
    assert costs["features.12"] == 2 * 2 * 32 * 9 + 64
    unfoldable = tiny_vgg()
    with torch.no_grad():  # features end at 2x2 for 64x64 inputs: the pool averages, nothing to fold
        big = torch.zeros(1, 3, 64, 64)
        g2 = build_graph(unfoldable, big)
        c2 = channel_costs(unfoldable, g2, prunable_convs(unfoldable, graph=g2), big)
    assert c2["features.12"] == 4 * 4 * 32 * 9 + 49 * 64


def test_macs_normalisation_ranks_importance_per_multiply_add():
    model = tiny_vgg()
    calib = Calibration([(X, Y)])
    per_mac = channel_plan(model, 0.3, importance="taylor", normalize="macs", round_to=1, calibration=calib)
    raw = channel_plan(model, 0.3, importance="taylor", normalize="none", round_to=1, calibration=calib)
    from prunelab.pruning.channel import prune_channels
    from prunelab.pruning.costs import count_macs
    macs = {k: count_macs(prune_channels(model, p, X[:1]), X[:1]) for k, p in (("macs", per_mac), ("none", raw))}
    assert sum(map(len, per_mac.values())) == sum(map(len, raw.values()))  # the same number of channels...
    assert macs["macs"] < macs["none"]  # ...buying fewer multiply-adds per image when weighed by their cost
    with pytest.raises(ValueError, match="prune.normalize must be one of"):
        channel_plan(model, 0.3, normalize="flops")


def test_hidden_linears_get_taylor_scores_and_costs():
    from prunelab.pruning.channel import build_graph, default_example
    from prunelab.pruning.costs import channel_costs

    model = tiny_vgg()
    layers = prunable_convs(model, linears=True)
    assert list(layers)[-2:] == ["classifier.0", "classifier.3"]
    with torch.no_grad():
        model.classifier[3].weight[5] = 0
        model.classifier[3].bias[5] = 0
    scores = taylor_scores(model, layers, [(X, Y)])
    assert scores["classifier.3"].shape == (64,) and scores["classifier.3"][5] == 0
    m = copy.deepcopy(model)
    loss = nn.functional.cross_entropy(m(X), Y)
    fc = m.classifier[0]
    gw, gb = torch.autograd.grad(loss, [fc.weight, fc.bias])
    assert torch.allclose(scores["classifier.0"], ((gw * fc.weight).sum(1) + gb * fc.bias).detach().pow(2),
                          rtol=1e-4, atol=1e-12)
    graph = build_graph(model, default_example(model))
    costs = channel_costs(model, graph, layers, default_example(model))
    assert costs["classifier.0"] == 32 + 64  # its row, served folded (one input per channel), and a column of classifier.3
    assert costs["classifier.3"] == 64 + 10  # its row and a column of the head
