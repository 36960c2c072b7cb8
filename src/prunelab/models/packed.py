"""Prepacked matrix multiplies for float32 CPU inference (oneDNN), and Linear layers that use them.

``F.linear``/``torch.mm`` re-lay the weight matrix out into the GEMM kernel's blocked format on every
call. At batch 128 that pass over VGG16's 4096x4096 classifier weight (64 MiB) is a large part of the
layer's time: 50 ms plain, 38 ms prepacked on the 2-core AVX2 EPYC (2026-11-28), the same sums in a
different order. ``pack_weight`` lays a weight out once (oneDNN's own format, as PyTorch's compiler
does when it freezes a model) and ``linear`` multiplies by it. Both need PyTorch built with oneDNN
(``available``).

:class:`TunedLinear` runs as ``plain`` or ``packed``, whichever was faster on the first batch of each
shape (:mod:`prunelab.models.tuning`); ``tune_linears`` wraps a network's Linear layers in place.
The packed copy is kept beside the weight (twice the layer's memory while ``packed`` is chosen).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prunelab.models.rewrite import replace_module
from prunelab.models.tuning import Tuned, algo_counts_by_batch

ALGOS = ("plain", "packed")


def available() -> bool:
    """Whether this PyTorch has oneDNN's prepacked linear (CPU builds with mkldnn) and oneDNN is enabled
    (``torch.backends.mkldnn.flags(enabled=False)`` turns it off)."""
    return (torch.backends.mkldnn.is_available() and bool(torch.backends.mkldnn.enabled)
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """An (out, in) float32 CPU weight laid out once for oneDNN's GEMM (an opaque oneDNN tensor)."""
    if not available():
        raise RuntimeError("this PyTorch has no oneDNN prepacked linear (torch.backends.mkldnn is unavailable)")
    if weight.dim() != 2 or weight.dtype != torch.float32 or weight.device.type != "cpu":
        raise ValueError(f"pack_weight takes a 2-D float32 CPU weight, got {tuple(weight.shape)} "
                         f"{weight.dtype} on {weight.device}")
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a 2-D ``x`` and ``packed = pack_weight(weight)`` (inference only)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None if bias is None else bias.detach(), "none", [], "")


class TunedLinear(Tuned, nn.Linear):
    """A Linear layer that runs as ``plain`` (``F.linear``) or ``packed`` (:func:`linear` on its weight
    packed once), whichever was faster for each input shape; ``algo`` forces one. Still an ``nn.Linear``
    sharing ``lin``'s weight and bias (same state-dict keys); call :meth:`invalidate` after changing the
    weight through ``.data``. Inputs other than 2-D float32 CPU batches without gradients run plain."""

    BASE, ALGOS = "plain", ALGOS

    def __init__(self, lin: nn.Linear, algo: str = "auto"):
        if type(lin) is not nn.Linear:
            raise ValueError(f"TunedLinear takes a plain nn.Linear, got {type(lin).__name__}")
        super().__init__(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta")
        self.weight, self.bias = lin.weight, lin.bias
        self.train(lin.training)
        self._init_tuning(algo)

    def geometry(self) -> tuple:
        return self.out_features, self.bias is not None

    def candidates(self, x: torch.Tensor) -> list[str]:
        return list(ALGOS)

    def uses(self, cache_key) -> str:
        return "packed"

    def run(self, algo: str, x: torch.Tensor) -> torch.Tensor:
        if algo == "packed":
            return linear(x, self._derived("packed", lambda: pack_weight(self.weight)), self.bias)
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or not available() or not self._fast_path(x):
            return F.linear(x, self.weight, self.bias)
        return self.tuned_forward(x)

    def extra_repr(self) -> str:
        return nn.Linear.extra_repr(self) + f", algo={self.algo}" + (f", choice={self.choice}" if self.choice else "")


def tune_linears(net: nn.Module, algo: str = "auto") -> int:
    """Wrap every plain ``nn.Linear`` of ``net`` with a strided weight (in place) in a :class:`TunedLinear`;
    returns how many."""
    count = 0
    for name, m in list(net.named_modules()):
        if type(m) is nn.Linear and m.weight.layout == torch.strided:
            replace_module(net, name, TunedLinear(m, algo))
            count += 1
    return count


def linear_algos(net: nn.Module) -> dict[int, dict[str, int]]:
    """{batch size: {algorithm: layers}} over the shapes each ``TunedLinear`` of ``net`` has tuned."""
    return algo_counts_by_batch(net, TunedLinear)
