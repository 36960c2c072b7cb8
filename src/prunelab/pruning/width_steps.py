"""How the iterative schedule asks channel pruning for a total ratio: each step's share of what is
left, and, with ``prune.linears=p``, the hidden layers' widths, so that steps reaching a target
leave the widths one shot at that target leaves (``search.iterative`` uses it through
``registry.steps``)."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from prunelab.pruning.channel import layer_widths, linears_exponent, removed_fraction
from prunelab.pruning.channel_graph import prunable_convs, width
from prunelab.pruning.masks import count_to_prune


class WidthSteps:
    """How the iterative schedule asks channel pruning for a total ratio: each step removes what is
    still missing of the target share of the prunable layers' original widths (the pruner ranks the
    surviving channels of the current network). ``linears``: as the pruner's option; with a number
    the target counts the convs alone, and each hidden layer is cut to the width one shot at the
    target leaves it (``options``)."""

    def __init__(self, linears: bool | float = False):
        self.linears = linears
        self.exponent = linears_exponent(linears)

    def start(self, net: nn.Module) -> dict[str, int]:
        """The prunable layers' widths before the first step."""
        return {n: width(c) for n, c in prunable_convs(net, linears=bool(self.linears)).items()}

    def options(self, net: nn.Module, target: float, original: Mapping[str, int]) -> dict:
        """Pruner options for the step to ``target``: with an exponent, each hidden layer's units
        to keep, counted from its starting width as one shot at ``target`` counts them (a share of
        what each step left would carry every step's rounding into the next)."""
        if self.exponent is None:
            return {}
        share = 1.0 - (1.0 - target) ** self.exponent
        return {"linears_kept": {n: w - count_to_prune(w, share) for n, w in original.items()
                                 if isinstance(net.get_submodule(n), nn.Linear)}}

    def ratio(self, net: nn.Module, target: float, original: Mapping[str, int]) -> float:
        if self.exponent is not None:
            original = {n: w for n, w in original.items() if isinstance(net.get_submodule(n), nn.Conv2d)}
        original_total = sum(original.values())
        current = layer_widths(net, original)
        remaining = sum(current[n] for n in original)
        missing = round(target * original_total) - (original_total - remaining)
        return max(0.0, min(0.999999, missing / remaining)) if remaining else 0.0

    def stats(self, pruned: nn.Module, stats: dict, original: Mapping[str, int]) -> dict:
        """A step's stats, its channel share counted against the original widths."""
        stats["channels_removed"] = removed_fraction(layer_widths(pruned, original), original)
        return stats
