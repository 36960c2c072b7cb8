"""prune.recover_distill: the dense model teaches a pruned one while it recovers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from prunelab.models import ImageClassifier
from prunelab.models.classifier import make_sgd
from tests.conftest import compose_cfg


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 3, 2, 2, generator=g), torch.randint(0, 5, (32,), generator=g)


def _kl(student, teacher, x, t):
    with torch.no_grad():
        return nn.functional.kl_div(torch.log_softmax(student(x) / t, 1), torch.log_softmax(teacher(x) / t, 1),
                                    reduction="batchmean", log_target=True).item()


def test_the_recovery_loss_mixes_cross_entropy_and_the_teachers_soft_targets():
    x, y = _batch()
    student = _net(0)
    same = ImageClassifier(net=copy.deepcopy(student), num_classes=5, distill=0.25, teacher=copy.deepcopy(student))
    hard = nn.functional.cross_entropy(student(x), y)
    # a teacher that answers as the student does adds nothing: the loss is 3/4 of the cross-entropy
    torch.testing.assert_close(same.training_step((x, y), 0), 0.75 * hard)
    teacher = _net(1)
    other = ImageClassifier(net=copy.deepcopy(student), num_classes=5, distill=0.25, distill_temperature=2.0,
                            teacher=teacher)
    expected = 0.75 * hard + 0.25 * 4.0 * _kl(student, teacher, x, 2.0)
    torch.testing.assert_close(other.training_step((x, y), 0), expected)
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert not any(k.startswith("_teacher") or "teacher" in k for k in other.state_dict())  # not saved


def test_distillation_moves_the_student_towards_the_teacher():
    x, y = _batch()
    teacher = _net(1)
    module = ImageClassifier(net=_net(0), num_classes=5, lr=0.5, momentum=0.0, weight_decay=0.0, distill=1.0,
                             distill_temperature=3.0, teacher=teacher)
    before = _kl(module.net, teacher, x, 3.0)
    opt = make_sgd(module.param_groups(), 0.5, 0.0, 0.0)
    for _ in range(20):
        opt.zero_grad()
        module.training_step((x, y), 0).backward()
        opt.step()
    assert _kl(module.net, teacher, x, 3.0) < 0.5 * before
    # distill=0 leaves the teacher out entirely
    assert ImageClassifier(net=_net(0), num_classes=5, teacher=teacher)._teacher is None


@pytest.mark.parametrize("kwargs, match", [
    ({"distill": 1.5}, "recover_distill must be in"), ({"distill": 0.5}, "needs a teacher"),
    ({"distill_temperature": 0.0}, "recover_temperature must be > 0")])
def test_bad_distillation_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageClassifier(net=_net(0), num_classes=5, **kwargs)


def test_recovery_is_taught_by_a_folded_copy_of_the_dense_model(tmp_path, monkeypatch):
    from prunelab.prune_stage import recover_fn, recovery_module
    from prunelab.pruning.spec import prune_spec
    from prunelab.resolve import resolve_auto
    from tests.test_fold_training import TinyVGG

    cfg = compose_cfg(tmp_path, ["+experiment=smoke", "prune.recover_distill=0.5", "prune.recover_temperature=2"])
    resolve_auto(cfg)
    p = prune_spec(cfg)
    assert (p.recover_distill, p.recover_temperature) == (0.5, 2.0)
    dense = TinyVGG()
    module = recovery_module(cfg, TinyVGG(), p, None, teacher=dense)
    assert module.hparams.distill == 0.5 and module._teacher is dense
    assert recovery_module(cfg, TinyVGG(), p).hparams.distill == 0.0  # no teacher, no distillation

    seen = {}

    def spy(cfg_, net, p_, masks=None, teacher=None):
        seen["teacher"] = teacher
        raise RuntimeError("stop")

    monkeypatch.setattr("prunelab.prune_stage.recovery_module", spy)
    with pytest.raises(RuntimeError, match="stop"):
        recover_fn(cfg, None, torch.device("cpu"), p, dense=dense)(TinyVGG(), None)
    teacher = seen["teacher"]
    assert teacher is not dense and teacher.classifier[0].in_features == 4  # a copy, its pool folded
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), dense(x))


def test_bad_distillation_config_is_one_message(tmp_path, run_cli):
    r = run_cli("+experiment=smoke", "prune.recover_distill=2")
    assert r.returncode == 2
    assert "prune.recover_distill" in r.stderr
