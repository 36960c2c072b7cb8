"""The from-scratch recipe's pieces: learning-rate schedule, Nesterov, label smoothing, dropout, and
the fine-tune keys of a length-dependent schedule."""

from __future__ import annotations

import math

import pytest
import torch
from lightning import Trainer
from torch.utils.data import DataLoader, TensorDataset

from conftest import compose_cfg
from prunelab.errors import ConfigError
from prunelab.lr_schedule import lr_factor
from prunelab.models import ImageClassifier, build_classifier


def test_warmup_is_linear_then_cosine_reaches_zero_at_the_last_step():
    f = lr_factor("cosine", total_steps=110, warmup_steps=10)
    assert [f(t) for t in range(3)] == [0.1, 0.2, 0.3]
    assert f(9) == 1.0 and f(10) == 1.0
    assert f(60) == pytest.approx(0.5)  # halfway through the decay
    assert f(110) == pytest.approx(0.0, abs=1e-12)
    decay = [f(t) for t in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))  # never rises after warm-up


def test_constant_schedule_with_warmup_stays_at_one():
    f = lr_factor("constant", total_steps=50, warmup_steps=4)
    assert [f(t) for t in (0, 3, 4, 49)] == [0.25, 1.0, 1.0, 1.0]


def test_warmup_longer_than_the_run_still_reaches_full_rate():
    f = lr_factor("cosine", total_steps=3, warmup_steps=100)
    assert f(0) == pytest.approx(0.5) and f(1) == 1.0


def _fit(module: ImageClassifier, epochs: int, batches: int = 4):
    data = TensorDataset(torch.randn(batches * 4, 3, 32, 32), torch.randint(0, 10, (batches * 4,)))
    lrs = []

    trainer = Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    orig = module.optimizer_step

    def step(*a, **k):
        lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
        return orig(*a, **k)

    module.optimizer_step = step
    trainer.fit(module, DataLoader(data, batch_size=4))
    return lrs, trainer


def test_the_module_steps_the_schedule_every_optimiser_step():
    module = ImageClassifier(arch="resnet18", weights=None, lr=0.1, schedule="cosine", warmup_epochs=0.5,
                             nesterov=True, label_smoothing=0.1)
    lrs, trainer = _fit(module, epochs=2)
    expected = lr_factor("cosine", 8, 2)
    assert lrs == pytest.approx([0.1 * expected(t) for t in range(8)])
    opt = trainer.optimizers[0]
    assert opt.param_groups[0]["nesterov"] is True


def test_the_default_model_keeps_a_constant_rate_and_plain_sgd():
    module = ImageClassifier(arch="resnet18", weights=None, lr=0.1)
    lrs, trainer = _fit(module, epochs=1)
    assert lrs == [0.1] * 4 and trainer.optimizers[0].param_groups[0]["nesterov"] is False
    assert not trainer.lr_scheduler_configs


def test_label_smoothing_shapes_the_training_loss_only():
    module = ImageClassifier(arch="resnet18", weights=None, label_smoothing=0.2)
    logits, y = torch.tensor([[4.0, 0.0, 0.0]]), torch.tensor([0])
    plain = torch.nn.functional.cross_entropy(logits, y)
    assert module.criterion(logits, y) == pytest.approx(plain.item())
    assert module.train_criterion(logits, y) > plain + 0.1


def test_dropout_reaches_vggs_classifier_and_is_refused_where_there_is_none():
    net = build_classifier("vgg16", None, 10, dropout=0.2)
    drops = [m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops == [0.2, 0.2]
    assert [m.p for m in build_classifier("vgg16", None, 10).modules() if isinstance(m, torch.nn.Dropout)] == [0.5, 0.5]
    with pytest.raises(ConfigError, match="model.dropout=0.2 but torchvision's resnet18 takes no dropout"):
        build_classifier("resnet18", None, 10, dropout=0.2)


@pytest.mark.parametrize("kwargs, match", [
    ({"schedule": "linear"}, "model.schedule"),
    ({"label_smoothing": 1.0}, "model.label_smoothing"),
    ({"warmup_epochs": -1}, "model.warmup_epochs"),
    ({"nesterov": True, "momentum": 0.0}, "model.nesterov"),
])
def test_bad_recipe_values_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageClassifier(arch="resnet18", weights=None, **kwargs)


def test_a_cosine_run_of_another_length_is_another_lineage(tmp_path):
    """A constant-rate run's first epochs are those of a longer run (its checkpoint may start it); a
    cosine run's are not, so its lineage keeps the length."""
    from prunelab.finetune import lineage_key

    base = ["+experiment=smoke"]
    constant = [lineage_key(compose_cfg(tmp_path, [*base, f"trainer.max_epochs={n}"])) for n in (2, 3)]
    assert constant[0] == constant[1]
    cosine = [lineage_key(compose_cfg(tmp_path, [*base, "model.schedule=cosine", f"trainer.max_epochs={n}"]))
              for n in (2, 3)]
    assert cosine[0] != cosine[1]


def test_the_scratch_experiment_composes_the_recipe(tmp_path):
    cfg = compose_cfg(tmp_path, ["+experiment=scratch"])
    m = cfg.model
    assert (m.weights, m.nesterov, m.schedule, m.label_smoothing) == (None, True, "cosine", 0.1)
    assert m.warmup_epochs > 0 and cfg.trainer.max_epochs >= 10 and not math.isnan(m.lr)


def test_the_recipes_search_prunes_channels_layerwise(tmp_path):
    from prunelab.pruning.registry import make_pruner
    from prunelab.pruning.spec import prune_spec

    options = prune_spec(compose_cfg(tmp_path, ["+experiment=scratch"])).pruner_options()
    pruner = make_pruner("channel", build_classifier("resnet18", None, 10), **options)
    assert options["scope"] == "layerwise" and pruner.layerwise
    assert not make_pruner("channel", build_classifier("resnet18", None, 10),
                           **prune_spec(compose_cfg(tmp_path, [])).pruner_options()).layerwise


# --- model.weights=PATH: training starts from a state_dict file -------------------------------------


def test_a_weights_file_starts_the_model_with_its_weights(tmp_path):
    from prunelab.io import save_state_dict

    source = build_classifier("resnet18", None, 10)
    path = save_state_dict(tmp_path / "start.pt", {k: v.half() if v.is_floating_point() else v
                                                   for k, v in source.state_dict().items()})
    net = build_classifier("resnet18", str(path), 10)
    for k, v in net.state_dict().items():  # cast back to the model's own dtype
        assert v.dtype == source.state_dict()[k].dtype
        torch.testing.assert_close(v, source.state_dict()[k].to(v.dtype).half().to(v.dtype))
    assert not torch.equal(net.fc.weight, build_classifier("resnet18", None, 10).fc.weight)


def test_a_weights_file_of_another_head_is_refused_naming_the_key(tmp_path):
    from prunelab.io import save_state_dict

    path = save_state_dict(tmp_path / "five.pt", build_classifier("resnet18", None, 5).state_dict())
    with pytest.raises(ConfigError, match=r"model.weights=.*five.pt does not fit.*fc.weight"):
        build_classifier("resnet18", str(path), 10)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"model.weights=.*empty.pt is empty"):
        build_classifier("resnet18", str(tmp_path / "empty.pt"), 10)


def test_a_folded_vgg_classifier_unfolds_to_the_same_function():
    """Where VGG's features end at 1x1 the average pool repeats each channel 49 times; the folded
    layer (out x C) on the channels equals the unfolded one (out x 49C) on the pooled, flattened map."""
    from prunelab.models.factory import unfold_classifier

    torch.manual_seed(0)
    folded = torch.randn(6, 4)
    sd = unfold_classifier({"classifier.0.weight": folded, "other": torch.ones(2)}, in_features=4 * 49)
    w = sd["classifier.0.weight"]
    assert w.shape == (6, 4 * 49) and torch.equal(sd["other"], torch.ones(2))
    channels = torch.randn(3, 4, 1, 1)
    pooled = torch.nn.functional.adaptive_avg_pool2d(channels, 7).flatten(1)  # 1x1 -> 7x7: repeats
    torch.testing.assert_close(pooled @ w.T, channels.flatten(1) @ folded.T)
    same = {"classifier.0.weight": torch.randn(6, 196)}
    assert unfold_classifier(same, 196) is same  # already in the layout: untouched


def test_the_weights_file_is_part_of_the_training_key(tmp_path):
    import os

    from prunelab.finetune import training_key
    from prunelab.io import save_state_dict

    path = save_state_dict(tmp_path / "start.pt", build_classifier("resnet18", None, 10).state_dict())
    over = ["+experiment=smoke", "model=resnet18", f"model.weights={path}"]
    first = training_key(compose_cfg(tmp_path, over))
    assert first == training_key(compose_cfg(tmp_path, over))
    assert first != training_key(compose_cfg(tmp_path, ["+experiment=smoke", "model=resnet18"]))
    save_state_dict(path, build_classifier("resnet18", None, 10).state_dict())  # retrained, same path
    os.utime(path, ns=(1, 1))
    assert training_key(compose_cfg(tmp_path, over)) != first


def test_a_missing_weights_file_is_refused_before_any_work(tmp_path):
    from prunelab.config_check import check

    cfg = compose_cfg(tmp_path, ["+experiment=smoke", f"model.weights={tmp_path}/absent.pt"])
    with pytest.raises(ConfigError, match=r"model.weights=.*absent.pt .*(no such|does not exist|not found)"):
        check(cfg)


def test_the_restart_experiment_is_the_recipe_from_a_weights_file(tmp_path):
    from prunelab.io import save_state_dict

    path = save_state_dict(tmp_path / "start.pt", build_classifier("resnet18", None, 10).state_dict())
    cfg = compose_cfg(tmp_path, ["+experiment=restart", "model=resnet18", f"model.weights={path}"])
    scratch = compose_cfg(tmp_path, ["+experiment=scratch"])
    assert cfg.model.weights == str(path) and cfg.model.schedule == scratch.model.schedule == "cosine"
    assert cfg.model.lr == scratch.model.lr and cfg.trainer.max_epochs < scratch.trainer.max_epochs
    assert cfg.model.warmup_epochs < scratch.model.warmup_epochs  # a warm start needs less warm-up
    assert compose_cfg(tmp_path, ["+experiment=restart"]).model.weights is None  # never ImageNet's
