"""Chained methods, e.g. ``channel+semi_structured``: whole channels first, then 2:4 on what remains.

The chain's ratio is its first method's; every later method runs at its full extent on the network
the earlier ones left (``semi_structured``: every eligible layer 2:4). So a search over the chain
walks the channel ratio, each candidate a smaller dense network whose Linear layers are also 2:4.
Stats count zeros against the original dense network, like every other pruner. No link empties the
classification head: ``channel`` and ``semi_structured`` leave it whole, and ``magnitude`` keeps each
class row at least its largest weight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

# What a later link of a chain runs at: its largest ratio (2:4 on every eligible layer).
FULL_EXTENT = {"semi_structured": 1.0}
SEPARATOR = "+"


def parts(method: str) -> list[str]:
    return method.split(SEPARATOR)


class ChainPruner:
    def __init__(self, model: nn.Module, first, later: list[tuple[str, Callable[[nn.Module], object]]]):
        self.model, self.first, self.later = model, first, later
        self.current: nn.Module | None = None
        self.links: list = []
        self.ratio = 0.0

    @property
    def head_rule(self) -> str | None:
        return getattr(self.first, "head_rule", None)

    def prepare(self, ratios: Iterable[float]) -> None:
        self.first.prepare(ratios)

    def apply(self, ratio: float) -> nn.Module:
        self.current = None  # let the previous candidate go first
        net = self.first.apply(ratio)
        self.links = []
        for method, make in self.later:
            pruner = make(net)
            net = pruner.apply(FULL_EXTENT[method])
            self.links.append(pruner)
        self.current, self.ratio = net, round(float(ratio), 6)
        return net

    def stats(self) -> dict:
        model = self.current if self.current is not None else self.model
        # Imported here: the method names above are read by the config check, before a run needs
        # torchvision, Torch-Pruning or Lightning.
        from prunelab.pruning.channel import ChannelPruner, channel_stats

        if isinstance(self.first, ChannelPruner):
            stats = channel_stats(model, self.model, self.first.example_input)
        else:
            stats = self.first.stats()
        for link in self.links:
            stats.update({k: v for k, v in link.stats().items() if k == "two_four_layers"})
        return dict(stats, ratio=self.ratio)

    def keep_masks(self) -> dict[str, torch.Tensor] | None:
        masks: dict[str, torch.Tensor] = {}
        for link in self.links:
            masks.update(link.keep_masks() or {})
        return masks or None

    def finish(self, ratio: float) -> nn.Module:
        return self.apply(ratio)
