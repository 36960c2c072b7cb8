"""2:4 semi-structured sparsity: in every 4 consecutive input weights, the 2 smallest are zeroed.

This is the one pattern with sparse hardware support (Ampere+ sparse tensor cores via cuSPARSELt
or CUTLASS): a 2:4 Linear can run at up to twice the dense matmul rate, while unstructured zeros
never speed up dense kernels. Groups run along the input dimension: a Linear row's
``in_features``, a Conv2d filter flattened to ``in * kh * kw``. A layer whose grouped dimension is
not a multiple of 4 (VGG's first conv, 3*3*3 = 27) is not eligible.

Whole layers are converted, so the pruned fraction moves in steps of half a layer. For a target
``ratio`` of all Conv2d+Linear weights, layers are taken in order of the relative magnitude they
lose (removed |w| / total |w|, cheapest first) while the pruned total stays within the ratio; the
first layer that would overshoot stops the walk, so a higher ratio always keeps the lower ratio's
layers (candidates of a search are nested). The classification head is never converted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from prunelab.models.factory import last_linear_name
from prunelab.pruning.masks import MaskedWeights, prunable_weights, sparsity

SPARSE_DTYPES = (torch.float16, torch.bfloat16)


def _grouped(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as (rows, groups, 4): rows are output units, groups run along the input."""
    w = weight.detach().reshape(weight.shape[0], -1)
    if w.shape[1] % 4:
        raise ValueError(f"a weight of shape {tuple(weight.shape)} has {w.shape[1]} inputs per output, "
                         "not a multiple of 4: it cannot be 2:4 sparse")
    return w.reshape(w.shape[0], -1, 4)


def eligible(weight: torch.Tensor) -> bool:
    return weight.dim() >= 2 and weight[0].numel() % 4 == 0


def two_four_mask(weight: torch.Tensor) -> torch.Tensor:
    """Boolean keep-mask shaped like ``weight``: the 2 largest |w| of every 4 consecutive inputs.

    Exactly two entries per group survive, even when magnitudes tie (``topk`` picks two).
    """
    g = _grouped(weight)
    keep = torch.zeros_like(g, dtype=torch.bool)
    keep.scatter_(-1, g.abs().topk(2, dim=-1).indices, True)
    return keep.reshape(weight.shape)


def is_two_four(weight: torch.Tensor) -> bool:
    """True when every group of 4 consecutive inputs holds at most 2 nonzeros."""
    if not eligible(weight):
        return False
    return bool(((_grouped(weight) != 0).sum(-1) <= 2).all())


def relative_loss(weight: torch.Tensor, keep: torch.Tensor) -> float:
    """Share of the layer's L1 magnitude that the mask removes."""
    a = weight.detach().abs().double()
    total = float(a.sum())
    return float(a[~keep].sum()) / total if total else 0.0


class SemiStructuredPruner:
    """Convert whole layers to 2:4, cheapest first, until the target fraction is reached.

    Like ``MagnitudePruner`` it keeps one pristine copy of the prunable weights and masks the
    model in place per candidate, so ``apply`` returns the same (masked-dense) model object.
    """

    method = "semi_structured"

    def __init__(self, model: nn.Module):
        self.model = model
        self.head = last_linear_name(model)
        self._state: MaskedWeights | None = None
        self._masks: dict[str, torch.Tensor] = {}
        self._order: list[tuple[str, float]] = []
        self._chosen: dict[float, list[str]] = {}
        self.layers: list[str] = []
        self.ratio: float = 0.0
        self._shortfall: str | None = None

    def prepare(self, ratios: Iterable[float]) -> None:
        """Mask and score every eligible layer once; then each ratio's layer list is a prefix."""
        if self._state is None:
            self._state = MaskedWeights(self.model)
            scored = []
            for name, w in self._state.original.items():
                if name == self.head or not eligible(w):
                    continue
                keep = two_four_mask(w)
                self._masks[name] = keep
                scored.append((name, relative_loss(w, keep)))
            # Stable sort: equal losses keep module order, so the choice is reproducible.
            self._order = sorted(scored, key=lambda item: item[1])
        total = sum(w.numel() for w in self._state.original.values())
        for r in ratios:
            r = round(float(r), 6)
            if not 0.0 <= r <= 1.0:
                raise ValueError(f"ratio must be in [0, 1], got {r}")
            if r in self._chosen:
                continue
            budget = math.floor(r * total + 1e-9)
            chosen, pruned = [], 0
            for name, _ in self._order:
                cost = int((~self._masks[name]).sum())
                if pruned + cost > budget:
                    break
                chosen.append(name)
                pruned += cost
            self._chosen[r] = chosen

    def layers_for(self, ratio: float) -> list[str]:
        ratio = round(float(ratio), 6)
        self.prepare([ratio])
        return list(self._chosen[ratio])

    @torch.no_grad()
    def apply(self, ratio: float) -> nn.Module:
        """Restore every weight, then zero the 2:4 pattern in ``ratio``'s layers; returns the model."""
        self.layers = self.layers_for(ratio)
        self.ratio = round(float(ratio), 6)
        self._shortfall = self._why_short(self.layers)
        chosen = set(self.layers)
        for name, w in self._state.weights.items():
            original = self._state.original[name]
            if name in chosen:
                torch.where(self._masks[name].to(w.device), original, w.new_zeros(()), out=w)
            else:
                w.copy_(original)
        return self.model

    def _why_short(self, layers: list[str]) -> str | None:
        """Why the weights zeroed fall short of the ratio asked for (None where they reach it, to
        half a point): whole layers go to 2:4, half of each; the head and layers whose input groups
        are not a multiple of 4 never do."""
        total = sum(w.numel() for w in self._state.original.values())
        zeroed = sum(int((~self._masks[n]).sum()) for n in layers)
        if zeroed / total >= self.ratio - 0.005:
            return None
        most = sum(int((~m).sum()) for m in self._masks.values()) / total
        if len(layers) == len(self._order):
            return (f"every eligible layer is 2:4 (half its weights zero) and the head and layers whose input groups "
                    f"are not a multiple of 4 are never converted: {most:.3f} is the most 2:4 reaches here")
        nxt = self._order[len(layers)][0]
        return (f"2:4 converts whole layers, half of each: the next cheapest layer ({nxt}) would have passed "
                f"{self.ratio:.2f}")

    def stats(self) -> dict:
        out = sparsity(self._state.weights if self._state else prunable_weights(self.model))
        out.update(ratio=self.ratio, two_four_layers=list(self.layers),
                   loss={name: loss for name, loss in self._order if name in set(self.layers)})
        if self._shortfall:
            out["shortfall"] = self._shortfall
        return out

    def keep_masks(self) -> dict[str, torch.Tensor]:
        """Keep-masks of the current candidate's 2:4 layers (for recovery: they must stay 2:4)."""
        return {name: self._masks[name] for name in self.layers}

    def finish(self, ratio: float) -> nn.Module:
        """Leave the model 2:4-masked at ``ratio`` and drop the pristine copy and masks."""
        model = self.apply(ratio)
        self._state.release()
        self._masks = {}
        self._chosen = {}
        return model


def _sparse_class_for(dtype: torch.dtype):
    """The tensor subclass ``to_sparse_semi_structured`` will build, and whether we must force CUTLASS."""
    from torch.sparse import (
        SparseSemiStructuredTensor,
        SparseSemiStructuredTensorCUSPARSELT,
        SparseSemiStructuredTensorCUTLASS,
    )

    cusparselt = getattr(torch.backends, "cusparselt", None)
    has_cusparselt = bool(cusparselt and cusparselt.is_available())
    if SparseSemiStructuredTensor._FORCE_CUTLASS or not has_cusparselt:
        return SparseSemiStructuredTensorCUTLASS, not SparseSemiStructuredTensor._FORCE_CUTLASS
    return SparseSemiStructuredTensorCUSPARSELT, False


def to_sparse_kernels(model: nn.Module, dtype: torch.dtype = torch.float16) -> tuple[nn.Module, bool, str]:
    """Swap the 2:4 Linear weights for ``SparseSemiStructuredTensor``s so matmuls use sparse kernels.

    Needs the model on a CUDA device of compute capability >= 8.0; the sparse kernels take only
    half precision, so the whole model is cast to ``dtype`` in place (feed it ``dtype`` inputs).
    Conv2d layers stay masked-dense (PyTorch has no 2:4 convolution kernel); so do Linear layers
    whose shape the backend rejects. Anywhere else the model is returned unchanged.

    Returns ``(model, used, reason)``: ``used`` is True when at least one layer runs sparse.
    """
    if dtype not in SPARSE_DTYPES:
        raise ValueError(f"2:4 kernels take {SPARSE_DTYPES}, got {dtype}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
        where = f"the model is on {device}" if device.type != "cuda" else \
            f"{torch.cuda.get_device_name(device)} is compute capability {'.'.join(map(str, torch.cuda.get_device_capability(device)))}"
        return model, False, f"no CUDA device of compute capability >= 8.0 ({where}): 2:4 weights run masked-dense"

    from torch.sparse import to_sparse_semi_structured

    cls, force_cutlass = _sparse_class_for(dtype)
    limits = cls._DTYPE_SHAPE_CONSTRAINTS[dtype]
    head = last_linear_name(model)
    model.to(dtype)
    converted, skipped = [], []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear) or name == head or not is_two_four(m.weight):
            continue
        rows, cols = m.weight.shape
        if rows % limits.sparse_min_rows or cols % limits.sparse_min_cols:
            skipped.append(f"{name} {rows}x{cols} (needs multiples of {limits.sparse_min_rows}x{limits.sparse_min_cols})")
            continue
        dense = m.weight.detach().contiguous()
        try:
            # cuSPARSELt missing: to_sparse_semi_structured would still pick it, so go to CUTLASS directly.
            sparse = cls.from_dense(dense) if force_cutlass else to_sparse_semi_structured(dense)
            # A trial product: conversion can succeed where the matmul cannot run (PyTorch's CUTLASS
            # 2:4 kernels are built for sm8x only), and a layer that fails here stays dense.
            trial = torch.zeros(max(limits.dense_min_rows, 8), cols, dtype=dtype, device=device)
            nn.functional.linear(trial, sparse)
            torch.cuda.synchronize(device)
        except RuntimeError as exc:
            skipped.append(f"{name} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
            continue
        m.weight = nn.Parameter(sparse, requires_grad=False)
        converted.append(name)
    if not converted:
        return model, False, "no 2:4 Linear layer the sparse kernels accept" + (f"; skipped {', '.join(skipped)}" if skipped else "")
    reason = f"{len(converted)} Linear layer(s) on {cls.BACKEND} 2:4 kernels in {dtype}: {', '.join(converted)}; convolutions run masked-dense"
    if skipped:
        reason += f"; skipped {', '.join(skipped)}"
    return model, True, reason
