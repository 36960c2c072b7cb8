"""Build any torchvision classification model by name with its last Linear replaced by an
N-class one, and turn failed weight downloads into one actionable message."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm

from prunelab.errors import ConfigError, WeightsFileError, WeightsUnavailableError
from prunelab.models.rewrite import replace_module, replicating_pools, spread_folded


def last_linear_name(net: nn.Module) -> str:
    names = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ConfigError(f"{type(net).__name__} has no Linear layer to replace with a new head")
    return names[-1]


def is_weights_file(weights) -> bool:
    """``model.weights`` names a state_dict file (a path, or a .pt/.pth name) rather than one of
    torchvision's weight sets (an upper-case enum name such as IMAGENET1K_V1)."""
    text = str(weights) if weights is not None else ""
    return "/" in text or text.endswith((".pt", ".pth"))


def weights_file_identity(weights) -> str | None:
    """Size and modification time of a ``model.weights`` file (part of the fine-tune key: a retrained
    file at the same path is another start); None for a weight-set name or a missing file."""
    if not is_weights_file(weights):
        return None
    try:
        st = Path(str(weights)).expanduser().stat()
    except OSError:
        return None
    return f"{st.st_size}-{st.st_mtime_ns}"


def unfold_classifier(state_dict: dict[str, torch.Tensor], in_features: int) -> dict[str, torch.Tensor]:
    """VGG's ``classifier.0.weight`` stored folded (out x C, C channels): where the features end at
    1x1 (32x32 inputs) the average pool repeats each channel ``in_features // C`` times, so those
    columns act only through their sum. Spread back over the columns, the layer computes the same
    function for such inputs, in torchvision's layout (out x in_features)."""
    w = state_dict.get("classifier.0.weight")
    if w is None or w.dim() != 2 or w.shape[1] == in_features or in_features % w.shape[1]:
        return state_dict
    return {**state_dict, "classifier.0.weight": spread_folded(w, in_features // w.shape[1])}


def load_start_weights(net: nn.Module, path: str) -> nn.Module:
    """``net`` with the weights of the state_dict file ``path`` (``model.weights=PATH``), cast to
    ``net``'s dtypes; a folded VGG classifier is unfolded. Refusals name the key to change."""
    from prunelab.io import load_state_dict, shape_mismatch

    try:
        state = load_state_dict(path)
    except WeightsFileError as exc:
        raise ConfigError(f"model.weights={path} {exc.problem}") from None
    own = net.state_dict()
    first = own.get("classifier.0.weight")
    if first is not None:
        state = unfold_classifier(state, first.shape[1])
    state = {k: v.to(own[k].dtype) if k in own and v.is_floating_point() else v for k, v in state.items()}
    problem = shape_mismatch({k: v.shape for k, v in own.items()}, state)
    if problem:
        raise ConfigError(f"model.weights={path} does not fit this model (model.arch, model.num_classes): {problem}")
    net.load_state_dict(state, strict=True)
    return net


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
    """``weights``: a torchvision weight set (its head replaced), None (random init), or a state_dict
    file of this very model (head included) to train on from. ``dropout``: the classifier's dropout probability for architectures whose constructor takes
    one (VGG, AlexNet, ...); None keeps the architecture's own."""
    available = tvm.list_models(module=tvm)
    if arch not in available:
        raise ConfigError(f"model.arch={arch} is not a torchvision classification model (e.g. vgg16, resnet18)")
    start_file = weights if is_weights_file(weights) else None
    enum = None if start_file else _resolve_weights(arch, weights)
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
    if start_file:
        load_start_weights(net, str(Path(start_file).expanduser()))
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
