"""Unstructured magnitude pruning bound to one model: rank once, mask candidates in place.

A ``MagnitudePruner`` keeps one pristine copy of the prunable weights. Each candidate restores
them and zeroes its ratio's smallest weights, so a search costs one ranking plus one masked copy
and one validation pass per ratio; there is no ``weight_orig``/``weight_mask`` reparametrisation,
so what is saved or timed is always a plain model.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from prunelab.pruning.masks import SCOPES, MaskedWeights, prunable_weights, rank, sparsity


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
        self._cuts: dict = {}
        self.masks: dict[str, torch.Tensor] | None = None

    def prepare(self, ratios: Iterable[float]) -> None:
        """Rank once for all ``ratios`` (before copying, so the sort and the copy never coexist)."""
        ratios = [round(float(r), 6) for r in ratios]
        if self._state is None:
            self._cuts.update(rank(prunable_weights(self.model), ratios, self.scope))
            self._state = MaskedWeights(self.model)
        else:
            missing = [r for r in ratios if r not in self._cuts]
            if missing:
                self._cuts.update(rank(self._state.original, missing, self.scope))

    def apply(self, ratio: float) -> nn.Module:
        """Mask the model in place at ``ratio`` and return it."""
        ratio = round(float(ratio), 6)
        if self._state is None or ratio not in self._cuts:
            self.prepare([ratio])
        self.masks = self._state.masks_for(self._cuts[ratio]) if ratio > 0 else None
        self._state.apply(self.masks)
        return self.model

    def keep_masks(self) -> dict[str, torch.Tensor] | None:
        return self.masks

    def stats(self) -> dict:
        return sparsity(self._state.weights if self._state else {})

    def finish(self, ratio: float) -> nn.Module:
        """Leave the model pruned at ``ratio`` and drop the pristine copy."""
        model = self.apply(ratio)
        if self._state is not None:
            self._state.release()
        return model
