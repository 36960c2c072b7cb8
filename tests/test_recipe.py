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
