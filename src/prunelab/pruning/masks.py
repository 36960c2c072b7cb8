"""Magnitude ranking and masks, pure PyTorch/NumPy (no Lightning).

Semantics match ``torch.nn.utils.prune``: at ratio r a group of n weights loses exactly
``round(r * n)`` of its smallest-magnitude entries (Python's rounding, as torch does). ``global``
ranks all Conv2d and Linear weights together (``global_unstructured`` with L1Unstructured);
``layerwise`` gives each layer its own ranking (``l1_unstructured`` per layer, the notebook's mode).

The magnitudes are sorted once per search and every ratio's threshold read off that sort, so a
candidate costs one masked copy of the weights, never a new sort (torch's pruning re-sorts the
102.8M weights of VGG16's ``classifier[0]`` for every call).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

SCOPES = ("global", "layerwise")
PRUNABLE_TYPES = (nn.Conv2d, nn.Linear)


def prunable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every Conv2d and Linear weight, keyed by module name, in module order (head included)."""
    return {name: m.weight for name, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)}


def count_to_prune(n: int, ratio: float) -> int:
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    return int(round(ratio * n))


@dataclass(frozen=True)
class Cut:
    """Where ratio r cuts a group: prune everything below ``value`` and the first ``ties`` entries
    equal to it (in flat order), which is exactly ``count`` weights."""

    value: float
    count: int


def _cuts_from_sorted(sorted_abs: np.ndarray, ratios: Iterable[float]) -> dict[float, Cut]:
    n = sorted_abs.size
    cuts = {}
    for r in ratios:
        k = count_to_prune(n, r)
        cuts[r] = Cut(float(sorted_abs[k - 1]) if k > 0 else float("-inf"), k)
    return cuts


def _abs_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().abs().reshape(-1).to("cpu", torch.float32).numpy()


def rank(weights: Mapping[str, torch.Tensor], ratios: Iterable[float], scope: str = "global") -> dict[float, dict[str, Cut] | Cut]:
    """Sort magnitudes once and return each ratio's cut: one ``Cut`` (global) or one per layer.

    The sorted copy (4 bytes per weight) is freed before returning, so a search holds the model,
    one copy of its weights and small per-ratio cuts.
    """
    if scope not in SCOPES:
        raise ValueError(f"prune.scope must be one of {SCOPES}, got {scope!r}")
    ratios = sorted(set(float(r) for r in ratios))
    if scope == "global":
        flat = np.concatenate([_abs_numpy(w) for w in weights.values()]) if weights else np.empty(0, np.float32)
        flat.sort()
        return _cuts_from_sorted(flat, ratios)
    per_layer: dict[float, dict[str, Cut]] = {r: {} for r in ratios}
    for name, w in weights.items():
        a = _abs_numpy(w)
        a.sort()
        for r, cut in _cuts_from_sorted(a, ratios).items():
            per_layer[r][name] = cut
    return per_layer


@torch.no_grad()
def _keep_masks_from_cut(weights: Mapping[str, torch.Tensor], cut: Cut) -> dict[str, torch.Tensor]:
    """Keep-masks for one group (all of ``weights``) cut at ``cut``: exactly ``cut.count`` pruned.

    Entries equal to the cut value are pruned in flat order (first ones first), so the count is
    exact even when magnitudes tie; without ties this is ``|w| > value``.
    """
    masks: dict[str, torch.Tensor] = {}
    pruned = 0
    for name, w in weights.items():
        w = w.detach()
        keep = (w > cut.value) | (w < -cut.value)  # |w| > value, without allocating |w|
        masks[name] = keep
        pruned += keep.numel() - int(keep.sum())
    excess = pruned - cut.count  # tied entries pruned beyond the count: keep the last ones
    for name in reversed(list(weights)):
        if excess <= 0:
            break
        flat_keep = masks[name].view(-1)
        ties = torch.nonzero(weights[name].detach().abs().view(-1) == cut.value).view(-1)
        take = ties[-excess:] if excess < ties.numel() else ties
        flat_keep[take] = True
        excess -= take.numel()
    return masks


def keep_masks(weights: Mapping[str, torch.Tensor], cut: Cut | Mapping[str, Cut]) -> dict[str, torch.Tensor]:
    """Boolean keep-masks (True = weight survives) for a cut returned by ``rank``."""
    if isinstance(cut, Cut):
        return _keep_masks_from_cut(weights, cut)
    masks = {}
    for name, w in weights.items():
        masks.update(_keep_masks_from_cut({name: w}, cut[name]))
    return masks


def magnitude_masks(weights: Mapping[str, torch.Tensor], ratio: float, scope: str = "global") -> dict[str, torch.Tensor]:
    """One-off masks at one ratio (ranks, then cuts); a search should call ``rank`` once instead."""
    return keep_masks(weights, rank(weights, [ratio], scope)[float(ratio)])


def sparsity(weights: Mapping[str, torch.Tensor]) -> dict:
    """Zero counts per layer and overall, as fractions of the prunable weights."""
    layers = {}
    total = zeros = 0
    for name, w in weights.items():
        n, z = w.numel(), int((w == 0).sum())
        layers[name] = {"params": n, "zeros": z, "sparsity": z / n if n else 0.0}
        total += n
        zeros += z
    return {"params": total, "zeros": zeros, "nonzero": total - zeros, "sparsity": zeros / total if total else 0.0, "layers": layers}


class MaskedWeights:
    """One pristine copy of the prunable weights, and the model's weights masked in place.

    ``apply(masks)`` restores every weight from the copy and zeroes the pruned entries, so every
    candidate of a search starts from the same fine-tuned weights without rebuilding the model.
    """

    def __init__(self, model: nn.Module):
        self.weights = prunable_weights(model)
        self.original = {n: w.detach().clone() for n, w in self.weights.items()}

    @torch.no_grad()
    def apply(self, masks: Mapping[str, torch.Tensor] | None) -> None:
        for name, w in self.weights.items():
            if masks is None:
                w.copy_(self.original[name])
            else:
                torch.where(masks[name].to(w.device), self.original[name], w.new_zeros(()), out=w)

    def masks_for(self, cut: Cut | Mapping[str, Cut]) -> dict[str, torch.Tensor]:
        # Always rank the pristine weights: the live ones already hold the last candidate's zeros.
        return keep_masks(self.original, cut)

    def restore(self) -> None:
        self.apply(None)

    def release(self) -> None:
        self.original = {}
