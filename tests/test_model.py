"""The model: head replacement for any torchvision classifier, clear errors offline."""

import urllib.error

import pytest
import torch
from torch import nn

from prunelab.errors import ConfigError, WeightsUnavailableError
from prunelab.models import ImageClassifier, build_classifier


def test_vgg16_head_is_10_class_and_param_count_matches_notebook():
    net = build_classifier("vgg16", None, 10)
    assert isinstance(net.classifier[6], nn.Linear)
    assert (net.classifier[6].in_features, net.classifier[6].out_features) == (4096, 10)
    assert sum(p.numel() for p in net.parameters()) == 134_301_514


def test_resnet18_head_replaced():
    net = build_classifier("resnet18", None, 10)
    assert net.fc.out_features == 10
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_unknown_arch_and_weights_are_config_errors():
    with pytest.raises(ConfigError, match="model.arch"):
        build_classifier("not_a_net", None)
    with pytest.raises(ConfigError, match="model.weights"):
        build_classifier("vgg16", "IMAGENET9K")


def test_weights_unavailable_says_where_to_put_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torch.hub.urlopen", offline)
    with pytest.raises(WeightsUnavailableError) as exc:
        build_classifier("vgg16", "IMAGENET1K_V1")
    msg = str(exc.value)
    assert "vgg16-397923af.pth" in msg and "model.weights=null" in msg and str(tmp_path) in msg


def test_module_step_and_optimizer_settings():
    m = ImageClassifier("resnet18", None, lr=0.05, momentum=0.8, weight_decay=1e-3)
    opt = m.configure_optimizers()
    g = opt.param_groups[0]
    assert isinstance(opt, torch.optim.SGD) and (g["lr"], g["momentum"], g["weight_decay"]) == (0.05, 0.8, 1e-3)
    assert not any(k.startswith("_compiled") for k in m.state_dict())
