"""Unstructured magnitude pruning bound to one model: rank once, mask candidates in place.

A ``MagnitudePruner`` keeps one pristine copy of the prunable weights. Each candidate restores
them and zeroes its ratio's smallest weights, layer by layer, so a search costs one ranking plus
one masked copy and one validation pass per ratio; there is no ``weight_orig``/``weight_mask``
reparametrisation, so what is saved or timed is always a plain model.

A candidate's zero counts come from its cuts (a layer keeps ``n - max(cut.count, zeros)``
nonzero weights), not from a pass over the weights, and its boolean masks are built only when
``keep_masks()`` is called (recovery needs them; the search does not).

The head is never emptied: every class keeps at least one weight. The cut is
``torch.nn.utils.prune``'s exactly (``global_unstructured`` or ``l1_unstructured`` per layer, the
head ranked with the rest), except that an output row of the classification head (the last
Linear) that the cut would leave without a nonzero weight keeps its largest-magnitude one. A class
whose row is all zero is a class the network can no longer score from its input: at a high
global ratio (the head's weights are the smallest of a barely trained VGG16) the whole head went,
and the "pruned model" answered one class for every image. The floor costs at most one weight per
class, touches no candidate whose head rows all survive the cut (every ordinary one), and is
counted in ``stats()``: a candidate zeroes ``round(ratio * n)`` weights less the rows kept.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from prunelab.pruning.masks import (
    SCOPES,
    Cut,
    MaskedWeights,
    emptied_rows,
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
    head_rule = "row-floor-1"  # part of a search journal's identity: each head row keeps its largest weight

    def __init__(self, model: nn.Module, scope: str = "global"):
        if scope not in SCOPES:
            raise ValueError(f"prune.scope must be one of {SCOPES}, got {scope!r}")
        self.model = model
        self.scope = scope
        self._state: MaskedWeights | None = None
        self._cuts: dict[float, dict[str, Cut]] = {}
        self._zeros: dict[str, int] = {}  # zeros of each pristine layer
        self.ratio = 0.0
        # The classification head: the last Linear (as models.factory names it), None without one.
        self.head: str | None = next((n for n, m in reversed(list(model.named_modules())) if isinstance(m, nn.Linear)), None)
        self.head_rows_kept = 0  # head rows the current candidate keeps one weight of

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
        self.head_rows_kept = self._keep_head_rows() if ratio > 0 else 0
        return self.model

    @torch.no_grad()
    def _keep_head_rows(self) -> int:
        """Give each head row the cut emptied its largest weight back; returns how many."""
        if self.head is None or self.head not in self._state.weights or not self._state.original:
            return 0
        w, original = self._state.weights[self.head], self._state.original[self.head]
        rows, cols = emptied_rows(w, original)
        if rows.numel():
            w.view(w.shape[0], -1)[rows, cols.to(w.device)] = original.view(w.shape[0], -1)[rows, cols].to(w.device)
        return int(rows.numel())

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
        masks = {name: layer_keep_mask(w, cuts[name]) for name, w in source.items()}
        if self.head in masks:  # the head rows apply() kept (after finish: the one weight left in each)
            keep = masks[self.head]
            rows, cols = emptied_rows(keep, source[self.head])
            keep.view(keep.shape[0], -1)[rows, cols.to(keep.device)] = True
        return masks

    def stats(self) -> dict:
        if self._state is None:
            return summarize({})
        cuts = self._cuts.get(self.ratio) if self.ratio > 0 else None
        layers = {}
        for name, w in self._state.weights.items():
            zeros = self._zeros[name]
            layers[name] = {"params": w.numel(), "zeros": max(cuts[name].count, zeros) if cuts else zeros}
        if cuts and self.head in layers:
            # A kept head weight was cut (rows are emptied only by cutting nonzero weights).
            layers[self.head]["zeros"] -= self.head_rows_kept
        out = summarize(layers)
        if self.head_rows_kept:
            out["head_rows_kept"] = self.head_rows_kept
        return out

    def finish(self, ratio: float) -> nn.Module:
        """Leave the model pruned at ``ratio`` and drop the pristine copy."""
        model = self.apply(ratio)
        if self._state is not None:
            self._state.release()
        return model
