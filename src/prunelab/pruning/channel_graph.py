"""Which layers of a network can lose outputs on their own: Torch-Pruning's dependency graph, traced
once, and the rule that a conv's channels (or, with ``linears``, a hidden Linear's units) are
prunable only when removing them touches no other layer's outputs and leaves the classes whole."""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from prunelab.models.factory import last_linear_name
from prunelab.models.modes import eval_mode


def default_example(model: nn.Module, size: int = 32) -> torch.Tensor:
    """A one-image input for tracing: the first conv's input channels at ``size`` x ``size``."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return torch.zeros(1, first.in_channels if first else 3, size, size)


def build_graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of ``model``, traced in eval mode (BatchNorm statistics
    untouched by the example) and leaving its train/eval flags as they were."""
    # Tracing needs autograd, which a caller's inference_mode/no_grad would silently disable.
    with eval_mode(model), torch.inference_mode(False), torch.enable_grad():
        return tp.DependencyGraph().build_dependency(model, example_inputs=example_input.clone(), verbose=False)


Layer = nn.Conv2d | nn.Linear


def out_fn(layer: nn.Module):
    """Torch-Pruning's function that removes ``layer``'s outputs (conv channels or Linear units)."""
    return tp.prune_conv_out_channels if isinstance(layer, nn.Conv2d) else tp.prune_linear_out_channels


def width(layer: nn.Module) -> int:
    """A prunable layer's output width: a conv's channels, a Linear's units."""
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features


def coupling(graph: tp.DependencyGraph, layer: nn.Module, head: nn.Module) -> str | None:
    """Why ``layer``'s outputs cannot be removed on their own, or None when they can."""
    if layer is head:
        return "it is the classification head (its outputs are the classes)"
    if isinstance(layer, nn.Conv2d) and layer.groups != 1:
        return "grouped convolution"
    for dep, _ in graph.get_pruning_group(layer, out_fn(layer), [0]):
        target = dep.target.module
        if target is head and (isinstance(layer, nn.Conv2d) or graph.is_out_channel_pruning_fn(dep.handler)):
            # A conv that reaches the head stays whole (channel pruning's rule from the start); a
            # hidden Linear's units are the head's inputs, and removing inputs leaves the classes whole.
            return "its channels feed the classification head"
        if target is not layer and isinstance(target, Layer) and graph.is_out_channel_pruning_fn(dep.handler):
            return "its channels are tied to another layer's outputs (residual add or depthwise conv)"
    return None


def prunable_convs(model: nn.Module, example_input: torch.Tensor | None = None,
                   graph: tp.DependencyGraph | None = None, linears: bool = False) -> dict[str, nn.Module]:
    """Convs whose output channels can be removed alone, by name, in module order; with
    ``linears``, also the hidden Linear layers whose units can be."""
    if graph is None:
        graph = build_graph(model, default_example(model) if example_input is None else example_input)
    head = model.get_submodule(last_linear_name(model))
    kinds = Layer if linears else nn.Conv2d
    return {name: m for name, m in model.named_modules()
            if isinstance(m, kinds) and coupling(graph, m, head) is None}
