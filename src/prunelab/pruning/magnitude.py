"""Unstructured magnitude pruning bound to one model: rank once, mask candidates in place.

A ``MagnitudePruner`` keeps one pristine copy of the prunable weights. Each candidate restores
them and zeroes its ratio's smallest weights, layer by layer, so a search costs one ranking plus
one masked copy and one validation pass per ratio; there is no ``weight_orig``/``weight_mask``
reparametrisation, so what is saved or timed is always a plain model.

A candidate's zero counts come from its cuts (a layer keeps ``n - max(cut.count, zeros)``
nonzero weights), not from a pass over the weights, and its boolean masks are built only when
``keep_masks()`` is called (recovery needs them; the search does not).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from prunelab.pruning.masks import (
    SCOPES,
    Cut,
    MaskedWeights,
    layer_cuts,
    layer_keep_mask,
    prunable_weights,
    summarize,
)


def search_ratios(grid: Iterable[float], refine_step: float | None) -> list[float]:
    """Every ratio a search can visit: the grid and every refine step in [0, 1)."""
    ratios = {round(float(r), 6) for r in grid}
    if refine_step:
        n = int(round(1.0 / refine_step))
        ratios |= {round(i * refine_step, 6) for i in range(1, n)}
    return sorted(ratios)


class MagnitudePruner:
    method = "magnitude"

    def __init__(self, model: nn.Module, scope: str = "global"):
        if scope not in SCOPES:
            raise ValueError(f"prune.scope must be one of {SCOPES}, got {scope!r}")
        self.model = model
        self.scope = scope
        self._state: MaskedWeights | None = None
        self._cuts: dict[float, dict[str, Cut]] = {}
        self._zeros: dict[str, int] = {}  # zeros of each pristine layer
        self.ratio = 0.0

    def prepare(self, ratios: Iterable[float]) -> None:
        """Rank once for all ``ratios`` (before copying, so the sort and the copy never coexist)."""
        ratios = [round(float(r), 6) for r in ratios]
        if self._state is None:
            cuts, self._zeros = layer_cuts(prunable_weights(self.model), ratios, self.scope)
            self._cuts.update(cuts)
            self._state = MaskedWeights(self.model)
        else:
            missing = [r for r in ratios if r not in self._cuts]
            if missing:
                self._cuts.update(layer_cuts(self._state.original, missing, self.scope)[0])

    def apply(self, ratio: float) -> nn.Module:
        """Mask the model in place at ``ratio`` and return it."""
        ratio = round(float(ratio), 6)
        if self._state is None or ratio not in self._cuts:
            self.prepare([ratio])
        self._state.apply_cuts(self._cuts[ratio] if ratio > 0 else None)
        self.ratio = ratio
        return self.model

    def keep_masks(self) -> dict[str, torch.Tensor] | None:
        """The current candidate's keep-masks, built now (None at ratio 0).

        Built from the pristine copy while there is one; after ``finish`` from the pruned weights
        themselves, which the same cuts map to the same masks (pruned entries are zero, kept
        ties still equal the cut value) as long as they have not been trained since.
        """
        if self._state is None or self.ratio == 0:
            return None
        cuts = self._cuts[self.ratio]
        source = self._state.original or self._state.weights
        return {name: layer_keep_mask(w, cuts[name]) for name, w in source.items()}

    def stats(self) -> dict:
        if self._state is None:
            return summarize({})
        cuts = self._cuts.get(self.ratio) if self.ratio > 0 else None
        layers = {}
        for name, w in self._state.weights.items():
            zeros = self._zeros[name]
            layers[name] = {"params": w.numel(), "zeros": max(cuts[name].count, zeros) if cuts else zeros}
        return summarize(layers)

    def finish(self, ratio: float) -> nn.Module:
        """Leave the model pruned at ``ratio`` and drop the pristine copy."""
        model = self.apply(ratio)
        if self._state is not None:
            self._state.release()
        return model
