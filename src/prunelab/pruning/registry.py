"""One constructor for every pruning method, so the search, the schedules and the report treat
``magnitude``, ``channel`` and ``semi_structured`` alike.

Every pruner has ``prepare(ratios)`` (rank once), ``apply(ratio) -> nn.Module`` (the candidate:
the same model masked in place, or a new smaller one), ``stats()``, ``keep_masks()`` (what must
stay zero while the candidate trains, or None) and ``finish(ratio) -> nn.Module``.
"""

from __future__ import annotations

import torch
from torch import nn

METHODS = ("magnitude", "channel", "semi_structured")


def make_pruner(method: str, model: nn.Module, scope: str = "global", importance: str = "l1",
                normalize: str = "mean", min_channels: int = 1, round_to: int = 1,
                example_input: torch.Tensor | None = None):
    if method == "magnitude":
        from prunelab.pruning.magnitude import MagnitudePruner

        return MagnitudePruner(model, scope)
    if method == "channel":
        from prunelab.pruning.channel import ChannelPruner, default_example

        example = example_input if example_input is not None else default_example(model)
        device = next(model.parameters()).device
        return ChannelPruner(model, example.to(device), importance=importance, min_channels=min_channels,
                             normalize=normalize, round_to=round_to)
    if method == "semi_structured":
        from prunelab.pruning.semi_structured import SemiStructuredPruner

        return SemiStructuredPruner(model)
    raise ValueError(f"prune.method must be one of {METHODS}, got {method!r}")


def candidate_extra(method: str, stats: dict) -> dict:
    """Per-candidate figures the report shows beside accuracy (params and MACs for channel)."""
    keys = {"channel": ("params", "macs", "channels", "channels_removed"), "semi_structured": ("two_four_layers",)}.get(method, ())
    return {k: stats[k] for k in keys if k in stats}
