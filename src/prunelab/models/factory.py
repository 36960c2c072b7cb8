"""Build any torchvision classification model by name with its last Linear replaced by an
N-class one, and turn failed weight downloads into one actionable message."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm

from prunelab.errors import ConfigError, WeightsUnavailableError
from prunelab.models.transforms import replace_module, replicating_pools


def last_linear_name(net: nn.Module) -> str:
    names = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ConfigError(f"{type(net).__name__} has no Linear layer to replace with a new head")
    return names[-1]


def _resolve_weights(arch: str, weights: str | None):
    if weights is None:
        return None
    try:
        return tvm.get_model_weights(arch)[weights]
    except KeyError:
        options = ", ".join(w.name for w in tvm.get_model_weights(arch))
        raise ConfigError(f"model.weights={weights} is not a weight set of {arch}; use one of {options} or null") from None


def build_classifier(arch: str = "vgg16", weights: str | None = None, num_classes: int = 10,
                     dropout: float | None = None) -> nn.Module:
    """``dropout``: the classifier's dropout probability for architectures whose constructor takes
    one (VGG, AlexNet, ...); None keeps the architecture's own."""
    available = tvm.list_models(module=tvm)
    if arch not in available:
        raise ConfigError(f"model.arch={arch} is not a torchvision classification model (e.g. vgg16, resnet18)")
    enum = _resolve_weights(arch, weights)
    extra = {} if dropout is None else {"dropout": float(dropout)}
    try:
        net = tvm.get_model(arch, weights=enum, **extra)
    except TypeError:  # an unexpected keyword: the architecture has no dropout argument
        if dropout is None:
            raise
        raise ConfigError(f"model.dropout={dropout} but torchvision's {arch} takes no dropout setting; "
                          "set model.dropout=null") from None
    except (OSError, RuntimeError) as exc:  # URLError is an OSError
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        filename = enum.url.rsplit("/", 1)[-1]
        raise WeightsUnavailableError(
            f"Could not fetch the {weights} weights of {arch} ({type(exc).__name__}: {exc}). "
            f"Put {filename} in {cache} (the torch hub cache, or set TORCH_HOME), "
            "or set model.weights=null to start from random init."
        ) from None
    head = last_linear_name(net)
    old = net.get_submodule(head)
    replace_module(net, head, nn.Linear(old.in_features, num_classes))
    return replicating_pools(net)  # same function; VGG's pool trains without atomic scatters on CUDA


def build_from_state_dict(arch: str, state_dict: dict[str, torch.Tensor], source: str = "state_dict") -> nn.Module:
    """torchvision ``arch`` with its head sized from ``state_dict``, weights loaded strictly."""
    try:
        with torch.device("meta"):  # skip initialising weights the state_dict overwrites
            net = tvm.get_model(arch, weights=None)
            head = last_linear_name(net)
            key = f"{head}.weight"
            if key not in state_dict:
                raise ConfigError(f"{source} has no {key}: it is not a torchvision {arch} state_dict")
            replace_module(net, head, nn.Linear(net.get_submodule(head).in_features, state_dict[key].shape[0]))
        net.load_state_dict(state_dict, strict=True, assign=True)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"{source} does not load into torchvision {arch}: {str(exc).splitlines()[0]}") from None
    return replicating_pools(net).eval()
