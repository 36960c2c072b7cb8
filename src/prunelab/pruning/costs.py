"""What removing one output channel of a conv saves: multiply-adds per image, its own and those of
the layers that read it, so a ranking can weigh a filter's importance against what cutting it buys
(``prune.normalize=macs``).

At 32x32 inputs VGG16's first convolutions run at full resolution and its last ones at 2x2: a
channel of ``features.2`` costs about 35 times the multiply-adds of one of ``features.28``. A
ranking by importance alone, across layers, cuts the late, cheap channels first and buys little
speed for its accuracy; per multiply-add saved it cuts where the time goes. ``count_macs`` counts
a whole network's, as the report gives them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch_pruning as tp
from torch import nn

from prunelab.models.modes import eval_mode
from prunelab.models.rewrite import folded_view


def _spatial(model: nn.Module, example: torch.Tensor) -> dict[nn.Module, int]:
    """Output positions per image (H x W; 1 for a Linear) of every Conv2d and Linear."""
    sizes: dict[nn.Module, int] = {}

    def hook(m: nn.Module, _inp, out: torch.Tensor) -> None:
        sizes[m] = out.shape[-1] * out.shape[-2] if isinstance(m, nn.Conv2d) else 1

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    try:
        with eval_mode(model), torch.no_grad():
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
    return sizes


def channel_costs(model: nn.Module, graph: tp.DependencyGraph, convs: Mapping[str, nn.Module],
                  example: torch.Tensor) -> dict[str, float]:
    """Per conv in ``convs`` (or hidden Linear: its row and the next layer's column), the
    multiply-adds per image one of its output channels costs: the filter's own (output positions x
    input channels / groups x kernel area) plus, for every layer that reads the channel (``graph``'s
    pruning group: the next conv's input channel, or the classifier inputs it feeds: 49 for VGG's
    pooled features, one where the served form folds the pool), what that input costs there."""
    spatial = _spatial(model, example)
    # Where the served form folds VGG's pool (features ending at 1x1: prunelab.models.rewrite), the 49
    # classifier inputs a channel is copied to are one input there: count what is served.
    try:
        folded_in = folded_view(model, tuple(example.shape[-2:]))[2].in_features
        first_fc = model.classifier[0]
    except (ValueError, AttributeError, TypeError, IndexError):
        first_fc = None  # nothing folds: the pool's copies are separate inputs
    costs = {}
    for name, conv in convs.items():
        if isinstance(conv, nn.Linear):  # a hidden unit (prune.linears): its row, read by the next Linear
            cost = folded_in if conv is first_fc else conv.in_features  # served folded: one input per channel
            fn = tp.prune_linear_out_channels
        else:
            kh, kw = conv.kernel_size
            cost, fn = spatial[conv] * (conv.in_channels // conv.groups) * kh * kw, tp.prune_conv_out_channels
        for dep, idxs in graph.get_pruning_group(conv, fn, [0]):
            m = dep.target.module
            if m is conv or graph.is_out_channel_pruning_fn(dep.handler):
                continue
            if isinstance(m, nn.Conv2d):
                mh, mw = m.kernel_size
                cost += len(idxs) * spatial[m] * (m.out_channels // m.groups) * mh * mw
            elif isinstance(m, nn.Linear):
                cost += (1 if first_fc is not None else len(idxs)) * m.out_features
        costs[name] = float(cost)
    return costs


def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """Multiply-accumulates of Conv2d and Linear layers for ONE example, counted by forward hooks.

    Our own counter (not ``tp.utils.count_ops_and_params``, which deep-copies the model): conv
    MACs = output elements x in_channels/groups x kernel area, Linear = output elements x
    in_features; pooling, activations and BatchNorm are not counted.
    """
    total = 0

    def hook(m: nn.Module, _inp, out: torch.Tensor) -> None:
        nonlocal total
        per_out = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1] if isinstance(m, nn.Conv2d) else m.in_features
        total += out.numel() * per_out

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    try:
        with eval_mode(model), torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    return total // max(1, example_input.shape[0])
