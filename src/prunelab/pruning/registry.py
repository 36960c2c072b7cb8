"""One constructor for every pruning method, so the search, the schedules and the report treat
``magnitude``, ``channel`` and ``semi_structured`` alike.

Every pruner has ``prepare(ratios)`` (rank once), ``apply(ratio) -> nn.Module`` (the candidate:
the same model masked in place, or a new smaller one), ``stats()``, ``keep_masks()`` (what must
stay zero while the candidate trains, or None) and ``finish(ratio) -> nn.Module``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def _magnitude(model: nn.Module, scope: str = "global", **_):
    from prunelab.pruning.magnitude import MagnitudePruner

    return MagnitudePruner(model, scope)


def _channel(model: nn.Module, importance: str = "l1", normalize: str = "mean", min_channels: int = 1,
             round_to: int = 16, example_input: torch.Tensor | None = None, **_):
    from prunelab.pruning.channel import ChannelPruner, default_example

    example = example_input if example_input is not None else default_example(model)
    device = next(model.parameters()).device
    return ChannelPruner(model, example.to(device), importance=importance, min_channels=min_channels,
                         normalize=normalize, round_to=round_to)


def _semi_structured(model: nn.Module, **_):
    from prunelab.pruning.semi_structured import SemiStructuredPruner

    return SemiStructuredPruner(model)


# method name -> constructor(model, **prune options); each takes the options it needs and ignores
# the rest, so every method is built from the same `prune.*` settings. A new method is one module
# plus one line here (or `register` from your own code).
PRUNERS: dict[str, Callable[..., object]] = {
    "magnitude": _magnitude,
    "channel": _channel,
    "semi_structured": _semi_structured,
}


def methods() -> tuple[str, ...]:
    """The method names ``prune.method`` accepts, registered ones included."""
    return tuple(PRUNERS)


def register(method: str, constructor: Callable[..., object]) -> None:
    """Add a pruning method: ``constructor(model, **prune_options)`` returns a pruner (see above)."""
    PRUNERS[method] = constructor


def is_known(method: str) -> bool:
    """A registered method, or a chain such as ``channel+semi_structured`` (see ``pruning.chain``)."""
    from prunelab.pruning.chain import FULL_EXTENT, parts

    names = parts(method)
    return all(n in PRUNERS for n in names) and all(n in FULL_EXTENT for n in names[1:])


def make_pruner(method: str, model: nn.Module, scope: str = "global", **options):
    if not is_known(method):
        raise ValueError(f"prune.method must be one of {tuple(PRUNERS)} or a chain such as "
                         f"channel+semi_structured, got {method!r}")
    from prunelab.pruning.chain import ChainPruner, parts

    first, *later = parts(method)
    pruner = PRUNERS[first](model, scope=scope, **options)
    if not later:
        return pruner
    return ChainPruner(model, pruner, [(m, lambda net, m=m: PRUNERS[m](net, scope=scope, **options)) for m in later])


def candidate_extra(method: str, stats: dict) -> dict:
    """Per-candidate figures the report shows beside accuracy (params and MACs where they change)."""
    per_method = {"channel": ("params", "macs", "channels", "channels_removed"),
                  "semi_structured": ("two_four_layers",)}
    keys = [k for part in method.split("+") for k in per_method.get(part, ())]
    return {k: stats[k] for k in keys if k in stats}
