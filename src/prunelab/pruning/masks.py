"""Magnitude ranking and masks, pure PyTorch/NumPy (no Lightning).

Semantics match ``torch.nn.utils.prune``: at ratio r a group of n weights loses exactly
``round(r * n)`` of its smallest-magnitude entries (Python's rounding, as torch does). ``global``
ranks all Conv2d and Linear weights together (``global_unstructured`` with L1Unstructured);
``layerwise`` gives each layer its own ranking (``l1_unstructured`` per layer, the notebook's mode).

The magnitudes are sorted once per search and every ratio's cut read off that sort, so a
candidate costs one masked copy of the weights, never a new sort (torch's pruning re-sorts the
102.8M weights of VGG16's ``classifier[0]`` for every call).

A candidate is applied one layer at a time, in chunks of ``CHUNK`` elements, straight from the
pristine copy (``hardshrink`` is exactly "keep ``|w| > value``" in one pass), so no boolean masks
of the whole model are held: a search stays at the model plus one pristine copy. Masks are built
only when asked for (``keep_masks``), e.g. to hold pruned weights at zero while training.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

SCOPES = ("global", "layerwise")
PRUNABLE_TYPES = (nn.Conv2d, nn.Linear)
# Elements per piece when a large layer is masked or counted: 8M keeps each temporary at
# 8-32 MB (VGG16's classifier.0 has 102.8M weights) while still amortising the kernel launches.
CHUNK = 1 << 23
# Tied magnitudes are searched from the end of a layer in smaller pieces: the search usually
# stops early, and its comparison temporaries stay at 4 MB each.
TIE_CHUNK = 1 << 22


def prunable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every Conv2d and Linear weight, keyed by module name, in module order (head included)."""
    return {name: m.weight for name, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)}


def count_to_prune(n: int, ratio: float) -> int:
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    return int(round(ratio * n))


@dataclass(frozen=True)
class Cut:
    """Where ratio r cuts a group: prune everything with ``|w| < value`` and the first ``ties``
    entries with ``|w| == value`` (in flat order), which is exactly ``count`` weights.

    ``tied`` is how many entries equal ``value``; when ``ties == tied`` the cut is simply
    "keep ``|w| > value``" and needs no tie resolution (the usual case with float weights).
    """

    value: float
    count: int
    ties: int = 0
    tied: int = 0

    @property
    def plain(self) -> bool:
        return self.ties == self.tied


NO_CUT = Cut(float("-inf"), 0)


def _cuts_from_sorted(sorted_abs: np.ndarray, ratios: Iterable[float]) -> dict[float, Cut]:
    n = sorted_abs.size
    cuts = {}
    for r in ratios:
        k = count_to_prune(n, r)
        if k == 0:
            cuts[r] = NO_CUT
            continue
        v = sorted_abs[k - 1]
        lo, hi = _equal_range(sorted_abs, v)
        cuts[r] = Cut(float(v), k, k - lo, hi - lo)
    return cuts


def _equal_range(sorted_abs: np.ndarray, v) -> tuple[int, int]:
    # v in the array's own dtype: a Python float would make numpy search a float64 copy (2x).
    v = sorted_abs.dtype.type(v)
    return int(np.searchsorted(sorted_abs, v, "left")), int(np.searchsorted(sorted_abs, v, "right"))


def _abs_into(t: torch.Tensor, out: np.ndarray) -> np.ndarray:
    """``|t|`` flattened into the float32 buffer ``out`` (no intermediate copy on the CPU)."""
    src = t.detach().reshape(-1)
    if src.device.type != "cpu" or src.dtype != torch.float32:
        src = src.to("cpu", torch.float32)
    torch.abs(src, out=torch.from_numpy(out))
    return out


def _sorted_abs(t: torch.Tensor) -> np.ndarray:
    a = _abs_into(t, np.empty(t.numel(), np.float32))
    a.sort()
    return a


def _shares(sorted_abs: np.ndarray, group: Mapping[float, Cut], left: dict[float, int]) -> dict[float, Cut]:
    """One layer's share of each group cut: its entries below the value, and its tied entries
    while the group still has ties to prune (``left``, updated; layers come in flat order)."""
    out = {}
    for r, g in group.items():
        if g.count == 0:
            out[r] = NO_CUT
            continue
        lo, hi = _equal_range(sorted_abs, g.value)
        take = min(hi - lo, left[r])
        left[r] -= take
        out[r] = Cut(g.value, lo + take, take, hi - lo)
    return out


def layer_cuts(weights: Mapping[str, torch.Tensor], ratios: Iterable[float],
               scope: str = "global") -> tuple[dict[float, dict[str, Cut]], dict[str, int]]:
    """Each ratio's cut of every layer, and each layer's zero count, from one sort per layer.

    Under ``global`` the one threshold is first found on all magnitudes together, then each
    layer's share of it (entries below, tied entries taken in flat order) is read off that
    layer's own sort; either way a candidate is then masked and counted layer by layer. At
    most one sorted copy exists at a time (the whole model's for ``global``, else one layer's).
    """
    if scope not in SCOPES:
        raise ValueError(f"prune.scope must be one of {SCOPES}, got {scope!r}")
    ratios = sorted(set(float(r) for r in ratios))
    group = rank(weights, ratios, "global") if scope == "global" else None
    per_layer: dict[float, dict[str, Cut]] = {r: {} for r in ratios}
    zeros: dict[str, int] = {}
    left = {r: c.ties for r, c in group.items()} if group else {}  # tied entries still to prune
    for name, w in weights.items():
        a = _sorted_abs(w)
        zeros[name] = _equal_range(a, 0.0)[1]
        cuts = _cuts_from_sorted(a, ratios) if group is None else _shares(a, group, left)
        del a  # before the next layer's copy exists
        for r, cut in cuts.items():
            per_layer[r][name] = cut
    return per_layer, zeros


def rank(weights: Mapping[str, torch.Tensor], ratios: Iterable[float], scope: str = "global") -> dict[float, dict[str, Cut] | Cut]:
    """Sort magnitudes once and return each ratio's cut: one ``Cut`` (global) or one per layer.

    The sorted copy (4 bytes per weight) is freed before returning, so a search holds the model,
    one copy of its weights and small per-ratio cuts.
    """
    if scope not in SCOPES:
        raise ValueError(f"prune.scope must be one of {SCOPES}, got {scope!r}")
    ratios = sorted(set(float(r) for r in ratios))
    if scope == "layerwise":
        return layer_cuts(weights, ratios, "layerwise")[0]
    # Filled in place: concatenating per-layer copies would hold the magnitudes twice.
    flat = np.empty(sum(w.numel() for w in weights.values()), np.float32)
    at = 0
    for w in weights.values():
        _abs_into(w, flat[at:at + w.numel()])
        at += w.numel()
    flat.sort()
    return _cuts_from_sorted(flat, ratios)


def _pieces(*tensors: torch.Tensor, size: int | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
    """Matching pieces of same-shaped tensors in flat (row-major) order: 1-D views of at most
    ``size`` (default ``CHUNK``) elements when all are contiguous, else the whole tensors (small
    conv weights in channels-last), whose own row-major order ``nonzero`` follows."""
    size = size or CHUNK
    if all(t.is_contiguous() for t in tensors):
        flats = [t.view(-1) for t in tensors]
        for i in range(0, flats[0].numel(), size):
            yield tuple(f[i:i + size] for f in flats)
    else:
        yield tensors


def _tied(piece: torch.Tensor, value: float) -> tuple[torch.Tensor, ...]:
    """Indices of the entries with ``|w| == value``, in flat order, without allocating ``|w|``."""
    return torch.nonzero((piece == value) | (piece == -value), as_tuple=True)


def _ties(pieces: Iterable[tuple[torch.Tensor, ...]], value: float, n: int,
          last: bool = True) -> Iterator[tuple[tuple[torch.Tensor, ...], tuple]]:
    """The last (or first) ``n`` entries with ``|w| == value`` in flat order (``w`` = each
    piece's last tensor), piece by piece from that end, stopping as soon as ``n`` are found.
    Pass small pieces: each costs three boolean temporaries of its size."""
    for piece in reversed(list(pieces)) if last else pieces:
        if n <= 0:
            return
        idx = _tied(piece[-1], value)
        m = idx[0].numel()
        if m:
            take = min(m, n)
            yield piece, tuple(i[m - take:] if last else i[:take] for i in idx)
            n -= take


@torch.no_grad()
def apply_cut(w: torch.Tensor, original: torch.Tensor, cut: Cut) -> None:
    """Write ``original`` cut at ``cut`` into ``w``, piece by piece: exactly ``cut.count`` zeroed."""
    if cut.count == 0:
        w.copy_(original)
        return
    # At value 0 the tied entries are zeros whether pruned or kept: no tie to resolve.
    revive = 0 if cut.value == 0 else cut.tied - cut.ties
    # Of the tied entries the first ``ties`` go and the last ``revive`` stay. Fix up the fewer
    # of the two, scanning from their end: a scan stops once it has found them all.
    first = cut.ties < revive
    # |o| > the float just below value keeps every tied entry; |o| > value drops them all. "Just
    # below" in the weights' own dtype: hardshrink casts its threshold to it, and in bf16/fp16 the
    # float32 neighbour would round back up to the value itself and drop every tie.
    lam = cut.value
    if first:
        v = torch.tensor(cut.value, dtype=w.dtype)
        lam = float(torch.nextafter(v, torch.zeros((), dtype=w.dtype)))
    for wp, op in _pieces(w, original):
        torch.hardshrink(op, lam, out=wp)
    if first:
        for (wp, _), idx in _ties(_pieces(w, original, size=TIE_CHUNK), cut.value, cut.ties, last=False):
            wp[idx] = 0
    elif revive:
        for (wp, op), idx in _ties(_pieces(w, original, size=TIE_CHUNK), cut.value, revive):
            wp[idx] = op[idx]


@torch.no_grad()
def layer_keep_mask(w: torch.Tensor, cut: Cut) -> torch.Tensor:
    """Boolean keep-mask of one tensor (True = survives) for its own ``cut``.

    ``w`` may be the pristine weights or the same weights already cut at ``cut``: the survivors
    are ``|w| > value`` and the last ``tied - ties`` tied entries in flat order either way
    (cutting zeroes the earlier ties, and at value 0 changes no value), so both give one mask.
    """
    w = w.detach()
    keep = torch.empty_like(w, dtype=torch.bool)
    if cut.count == 0:
        return keep.fill_(True)
    for kp, wp in _pieces(keep, w):
        torch.gt(wp, cut.value, out=kp)
        kp.logical_or_(wp < -cut.value)
    if not cut.plain:
        for (kp, _), idx in _ties(_pieces(keep, w, size=TIE_CHUNK), cut.value, cut.tied - cut.ties):
            kp[idx] = True
    return keep


@torch.no_grad()
def split(weights: Mapping[str, torch.Tensor], cut: Cut) -> dict[str, Cut]:
    """One group's cut as each layer's share of it (one counting pass, no sort)."""
    out, left = {}, cut.ties
    for name, w in weights.items():
        if cut.count == 0:
            out[name] = NO_CUT
            continue
        below = tied = 0
        for (wp,) in _pieces(w.detach()):
            below += int(torch.count_nonzero((wp < cut.value) & (wp > -cut.value)))
            tied += int(torch.count_nonzero((wp == cut.value) | (wp == -cut.value)))
        take = min(tied, left)
        left -= take
        out[name] = Cut(cut.value, below + take, take, tied)
    return out


def keep_masks(weights: Mapping[str, torch.Tensor], cut: Cut | Mapping[str, Cut]) -> dict[str, torch.Tensor]:
    """Boolean keep-masks (True = weight survives) for a cut returned by ``rank``."""
    cuts = split(weights, cut) if isinstance(cut, Cut) else cut
    return {name: layer_keep_mask(w, cuts[name]) for name, w in weights.items()}


def magnitude_masks(weights: Mapping[str, torch.Tensor], ratio: float, scope: str = "global") -> dict[str, torch.Tensor]:
    """One-off masks at one ratio (ranks, then cuts); a search should call ``rank`` once instead."""
    return keep_masks(weights, rank(weights, [ratio], scope)[float(ratio)])


@torch.no_grad()
def emptied_rows(kept: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a head keeps one weight per class: ``(rows, cols)`` of each output row of ``source``
    that has a nonzero weight but of which ``kept`` (a keep-mask or the cut weights, same shape)
    leaves no nonzero one, with the column of that row's largest ``|w|`` (the first of equal ones
    in flat order). A row whose weights are all zero has nothing to keep and is not listed."""
    src = source.detach().reshape(source.shape[0], -1)
    alive = kept.detach().reshape(src.shape[0], -1) != 0
    if kept.dtype == torch.bool:
        alive = alive & (src != 0)
    rows = torch.nonzero(~alive.any(1) & (src != 0).any(1)).flatten()
    return rows, src[rows].abs().argmax(1)


def summarize(layers: dict[str, dict]) -> dict:
    """Totals over per-layer ``{"params", "zeros"}``, in the shape ``sparsity`` returns."""
    total = sum(v["params"] for v in layers.values())
    zeros = sum(v["zeros"] for v in layers.values())
    for v in layers.values():
        v["sparsity"] = v["zeros"] / v["params"] if v["params"] else 0.0
    return {"params": total, "zeros": zeros, "nonzero": total - zeros, "sparsity": zeros / total if total else 0.0,
            "layers": layers}


def sparsity(weights: Mapping[str, torch.Tensor]) -> dict:
    """Zero counts per layer and overall, as fractions of the prunable weights."""
    # count_nonzero, not (w == 0).sum(): the sum materialises an int64 copy (8 bytes per weight).
    return summarize({name: {"params": w.numel(), "zeros": w.numel() - int(torch.count_nonzero(w))}
                      for name, w in weights.items()})


class MaskedWeights:
    """One pristine copy of the prunable weights, and the model's weights masked in place.

    ``apply_cuts(cuts)`` (or ``apply(masks)``) restores every weight from the copy and zeroes the
    pruned entries, so every candidate of a search starts from the same fine-tuned weights
    without rebuilding the model.
    """

    def __init__(self, model: nn.Module):
        self.weights = prunable_weights(model)
        self.original = {n: w.detach().clone() for n, w in self.weights.items()}

    @torch.no_grad()
    def apply_cuts(self, cuts: Mapping[str, Cut] | None) -> None:
        """Restore, then cut each layer at its own ``Cut`` (None: restore only), one layer at a time."""
        for name, w in self.weights.items():
            apply_cut(w, self.original[name], cuts[name] if cuts is not None else NO_CUT)

    @torch.no_grad()
    def apply(self, masks: Mapping[str, torch.Tensor] | None) -> None:
        for name, w in self.weights.items():
            if masks is None:
                w.copy_(self.original[name])
            else:
                torch.where(masks[name].to(w.device), self.original[name], w.new_zeros(()), out=w)

    def restore(self) -> None:
        self.apply(None)

    def release(self) -> None:
        self.original = {}
