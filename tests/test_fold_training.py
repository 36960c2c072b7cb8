"""model.fold_classifier: a VGG trained in its folded form follows the full network's SGD trajectory,
checkpoints and resumes in the folded form, and leaves training as torchvision's network."""

from __future__ import annotations

import copy

import pytest
import torch
from lightning import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from prunelab.errors import ConfigError
from prunelab.models import ImageClassifier
from prunelab.models.classifier import make_sgd
from prunelab.models.rewrite import (
    OneByOnePool,
    ReplicatingAdaptiveAvgPool2d,
    fold_for_training,
    fold_training_problem,
    unfold_after_training,
)
from prunelab.resolve import resolve_auto
from tests.conftest import compose_cfg


class TinyVGG(nn.Module):
    """VGG's layout (features to 1x1 at 32x32, a 7x7 pool, classifier[0] over the 49 copies) at a
    size that trains in milliseconds."""

    def __init__(self, width: int = 4, hidden: int = 8):
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for _ in range(5):
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c = width
        self.features = nn.Sequential(*layers)
        self.avgpool = ReplicatingAdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(nn.Linear(width * 49, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _batches(n: int = 6, size: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, size, size, generator=g, dtype=torch.float64), torch.randint(0, 10, (8,), generator=g))
            for _ in range(n)]


def _sgd_steps(module: ImageClassifier, batches, lr=0.05, wd=5e-3):
    opt = make_sgd(module.param_groups(), lr, 0.9, wd, nesterov=True)
    for x, y in batches:
        loss = nn.functional.cross_entropy(module.net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_the_folded_network_follows_the_full_networks_sgd_trajectory():
    torch.manual_seed(0)
    net = TinyVGG().double()
    full = ImageClassifier(net=copy.deepcopy(net), lr=0.05, weight_decay=5e-3)
    folded = ImageClassifier(net=copy.deepcopy(net), lr=0.05, weight_decay=5e-3, fold_classifier=True)
    folded.setup("fit")
    assert folded.net.classifier[0].weight.shape == (8, 4)  # the 49 blocks summed
    assert isinstance(folded.net.avgpool, OneByOnePool)
    groups = folded.param_groups()
    assert groups[1]["lr"] == pytest.approx(0.05 * 49) and groups[1]["weight_decay"] == pytest.approx(5e-3 / 49)
    batches = _batches()
    _sgd_steps(full, batches)
    _sgd_steps(folded, batches)
    # momentum, Nesterov and weight decay are linear: the folded weight is the full one's block sum
    torch.testing.assert_close(folded.net.classifier[0].weight,
                               full.net.classifier[0].weight.view(8, 4, 49).sum(-1), rtol=1e-9, atol=1e-12)
    for name in ("features.0.weight", "classifier.2.weight", "classifier.0.bias"):
        torch.testing.assert_close(folded.net.get_parameter(name), full.net.get_parameter(name), rtol=1e-9, atol=1e-12)
    folded.teardown("fit")
    assert folded.net.classifier[0].weight.shape == full.net.classifier[0].weight.shape
    assert isinstance(folded.net.avgpool, ReplicatingAdaptiveAvgPool2d)
    x = _batches(1, seed=1)[0][0]
    torch.testing.assert_close(folded.net(x), full.net(x), rtol=1e-9, atol=1e-12)


def test_unfolding_spreads_the_sum_evenly_and_keeps_torchvisions_keys():
    net = TinyVGG()
    keys = {k: v.shape for k, v in net.state_dict().items()}
    before = net.classifier[0].weight.detach().clone()
    assert fold_for_training(net) == 49
    unfold_after_training(net)
    assert {k: v.shape for k, v in net.state_dict().items()} == keys
    blocks = net.classifier[0].weight.detach().view(8, 4, 49)
    torch.testing.assert_close(blocks, blocks[..., :1].expand_as(blocks))  # every block alike
    torch.testing.assert_close(blocks.sum(-1), before.view(8, 4, 49).sum(-1))
    unfold_after_training(net)  # not folded: nothing changes
    assert net.classifier[0].weight.shape == (8, 4 * 49)


def test_the_folded_pool_refuses_a_feature_map_other_than_1x1():
    net = TinyVGG()
    fold_for_training(net)
    with pytest.raises(RuntimeError, match="1x1 feature map.*fold_classifier=false"):
        net(torch.randn(1, 3, 64, 64))


class SeesAtTheEnd(Callback):
    """What a user's callback sees of the network when training ends."""

    def on_train_end(self, trainer, pl_module):
        self.train_end = tuple(pl_module.net.classifier[0].weight.shape)

    def on_fit_end(self, trainer, pl_module):
        self.fit_end = tuple(pl_module.net.classifier[0].weight.shape)


def _fit(module, loader, tmp_path, max_epochs, ckpt_path=None, callbacks=()):
    trainer = Trainer(max_epochs=max_epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                      callbacks=list(callbacks), num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path)
    return module


def test_a_folded_fit_checkpoints_folded_resumes_exactly_and_ends_unfolded(tmp_path):
    data = [(x.float(), y) for x, y in _batches(4)]
    loader = DataLoader(TensorDataset(torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])), batch_size=8)
    torch.manual_seed(0)
    start = TinyVGG()

    def module():
        return ImageClassifier(net=copy.deepcopy(start), lr=0.05, momentum=0.9, nesterov=True, fold_classifier=True)

    def checkpoints(folder):
        return ModelCheckpoint(dirpath=tmp_path / folder, save_top_k=-1, every_n_epochs=1, filename="{epoch}")

    seen = SeesAtTheEnd()
    whole = _fit(module(), loader, tmp_path, 3, callbacks=[checkpoints("a"), seen])
    assert whole.net.classifier[0].weight.shape == (8, 4 * 49)  # unfolded when the fit ended
    assert seen.train_end == seen.fit_end == (8, 4 * 49)  # before any callback's end-of-training hook
    for epoch in range(3):  # the last one too, saved after the last epoch's unfold
        saved = torch.load(tmp_path / "a" / f"epoch={epoch}.ckpt", weights_only=True)
        assert saved["state_dict"]["net.classifier.0.weight"].shape == (8, 4)
    resumed = _fit(module(), loader, tmp_path, 3, ckpt_path=str(tmp_path / "a" / "epoch=0.ckpt"))
    _fit(module(), loader, tmp_path, 2, callbacks=[checkpoints("b")])  # a shorter run, continued
    continued = _fit(module(), loader, tmp_path, 3, ckpt_path=str(tmp_path / "b" / "epoch=1.ckpt"))
    for k, v in whole.net.state_dict().items():
        assert torch.equal(v, resumed.net.state_dict()[k]), k
        assert torch.equal(v, continued.net.state_dict()[k]), k
    # the full form's fit cannot take the folded checkpoint: one message naming the setting
    full = ImageClassifier(net=copy.deepcopy(start), lr=0.05)
    with pytest.raises(ConfigError, match="model.fold_classifier=true"):
        _fit(full, loader, tmp_path, 3, ckpt_path=str(tmp_path / "a" / "epoch=0.ckpt"))


class StopAfterFirstEpoch(Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            trainer.should_stop = True


def test_a_stop_refused_until_min_epochs_folds_back_and_trains_on(tmp_path):
    """The first epoch looks like the last (a stop request), the network unfolds; min_epochs keeps the
    fit going, and it must go on training the folded parameters the optimiser holds."""
    loader = DataLoader(TensorDataset(torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))), batch_size=8)
    torch.manual_seed(0)
    start = TinyVGG()

    def fit(callbacks, **kw):
        module = ImageClassifier(net=copy.deepcopy(start), lr=0.05, momentum=0.9, fold_classifier=True)
        Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                enable_checkpointing=False, callbacks=callbacks, num_sanity_val_steps=0, limit_val_batches=0,
                **kw).fit(module, train_dataloaders=loader)
        return module.net.state_dict()

    plain = fit([])
    refused = fit([StopAfterFirstEpoch()], min_epochs=3)
    for k, v in plain.items():
        assert torch.equal(v, refused[k]), k


def test_fold_rule_names_what_stops_it():
    assert fold_training_problem("vgg16", 32) is None
    assert fold_training_problem("vgg19_bn", 48) is None
    assert "2x2" in fold_training_problem("vgg16", 64)
    assert "no VGG" in fold_training_problem("resnet18", 32)
    with pytest.raises(ValueError, match="fold_classifier must be true or false"):
        ImageClassifier(net=TinyVGG(), fold_classifier="auto")


@pytest.mark.parametrize("overrides, value", [
    ([], True),
    (["model=resnet18"], False),
    (["data=imagefolder", "data.root=/nowhere", "data.image_size=64"], False),
    (["model.fold_classifier=false"], False),
])
def test_auto_folds_where_exact(tmp_path, overrides, value):
    cfg = compose_cfg(tmp_path, overrides)
    record = resolve_auto(cfg)
    assert cfg.model.fold_classifier is value
    assert record["model.fold_classifier"]["value"] is value


def test_an_explicit_fold_where_it_is_not_exact_is_refused(tmp_path, run_cli):
    root = tmp_path / "nowhere"
    r = run_cli("data=imagefolder", f"data.root={root}", "data.image_size=64", "model.fold_classifier=true")
    assert r.returncode == 2
    assert "model.fold_classifier=true, but 64x64 images end VGG's features at 2x2" in r.stderr


@pytest.mark.parametrize("masks, fold", [(None, True), ({"features.0": None}, True), ({"classifier.0": None}, False)])
def test_recovery_folds_unless_a_mask_holds_the_classifier(tmp_path, masks, fold):
    from prunelab.prune_stage import recovery_module
    from prunelab.pruning.spec import prune_spec

    cfg = compose_cfg(tmp_path, ["+experiment=smoke"])
    resolve_auto(cfg)
    assert cfg.model.fold_classifier is True
    assert recovery_module(cfg, TinyVGG(), prune_spec(cfg), masks).hparams.fold_classifier is fold
