"""Fewer multiplies for 3x3 convolutions on the CPU: Winograd F(4x4,3x3) and, on tiny maps, one matrix.

On a CPU without native bf16 the deploy form runs in float32, and oneDNN's direct convolution
already runs VGG16 at the machine's matrix-multiply rate (AVX2 EPYC, 2026-11-27: 101% of a
4096x4096 fp32 GEMM's rate), so only doing fewer multiplies makes it faster:

- ``winograd``: F(4x4,3x3) computes each 4x4 output tile from a 6x6 input tile with 36 multiplies
  per channel pair instead of 144: input tiles and filters go through fixed linear transforms, the
  channels are contracted by one batched GEMM per tile position (36 of them), and a third transform
  gives the outputs. The transforms are memory passes, so it pays on small maps with many channels
  (VGG16's 8x8 and 4x4 layers at batch 128) and loses on large maps with few. Its rounding error is
  ~1e-5 of the output's scale in float32; in bf16/fp16 the transforms would amplify rounding too far,
  so it is float32 only.
- ``map``: on a map of at most ``MAP_MAX_PIXELS`` pixels a zero-padded 3x3 convolution is one
  linear map from the HxWxC inputs to the HxWxK outputs: one GEMM on the channels-last tensor as it
  is (no patch copies, no padding handled per tap). On 2x2 it does the 16 products per channel pair
  that touch the map, where a kernel computing every tap does 36. Each matrix entry is one filter
  weight or zero, so it differs from the convolution only in the order of the sums.

:class:`TunedConv2d` chooses among ``direct`` (the wrapped ``nn.Conv2d``), ``winograd`` and ``map``
per layer and per input shape (and layout and thread count), by timing each on the first batch of
that shape (as cuDNN's autotuning does on GPUs), and keeps an alternative only when it ran at least
``MARGIN`` faster than the direct convolution. Choices are shared within the process by layer
geometry, as cuDNN's autotuning cache is: a dense network and its magnitude-pruned copy (the same
shapes) run the same algorithms, so their timings in turns differ by what pruning changed and never
by a tuning coin-flip (``clear_decisions`` forgets them). Each layer is timed alone, so the choice is as good
as those timings: on a machine shared with other work a layer can miss its faster algorithm (the
answers never change). Alternatives return the input's layout. It runs the plain convolution
whenever the input is not float32 on the CPU or gradients are wanted.
"""

from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F
from torch import nn

from prunelab.models.transforms import replace_module

ALGOS = ("direct", "winograd", "map")
MAP_MAX_PIXELS = 4  # (HW)^2 multiplies per channel pair against direct's 9 HW: fewer only while HW < 9
MARGIN = 0.05  # an alternative must beat the direct convolution by this fraction to be kept
TUNE_ROUNDS = 5  # timed calls of each algorithm, in turns, after one untimed call; the fastest counts
# Choices made in this process, by layer geometry (input shape, layout, threads, output channels, bias):
# {geometry: (algorithm, ms of each)}. Speed depends on the geometry, not the weights' values.
_DECISIONS: dict[tuple, tuple[str, dict[str, float]]] = {}

# F(4x4,3x3) (Lavin & Gray, 2016; interpolation points 0, +-1, +-2, infinity): Y = A^T [(G g G^T) * (B^T d B)] A.
_BT = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
       (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))
_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
      (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
_AT = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))
TILE, OUT = 6, 4  # input and output tile sizes


@functools.cache
def tile_transforms(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed matrices, made once per dtype and device: (36, 36) taking a flattened 6x6 input tile d
    to B^T d B, and (16, 36) taking a flattened 6x6 product tile m to the 4x4 outputs A^T m A (all
    flattened row-major)."""
    bt, at = (torch.tensor(rows, dtype=torch.float64, device=device) for rows in (_BT, _AT))
    return torch.kron(bt, bt).to(dtype), torch.kron(at, at).to(dtype)


def winograd_filters(weight: torch.Tensor) -> torch.Tensor:
    """(36, C, K): each 3x3 filter of a (K, C, 3, 3) weight as G g G^T, computed in float64."""
    if weight.dim() != 4 or tuple(weight.shape[-2:]) != (3, 3):
        raise ValueError(f"Winograd F(4x4,3x3) needs a (K, C, 3, 3) weight, got {tuple(weight.shape)}")
    g = torch.tensor(_G, dtype=torch.float64, device=weight.device)
    u = torch.einsum("ia,kcab,jb->ijck", g, weight.detach().double(), g)
    return u.reshape(TILE * TILE, weight.shape[1], weight.shape[0]).to(weight.dtype).contiguous()


def winograd_conv3x3(x: torch.Tensor, filters: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv2d(x, w, bias, padding=1)`` for a 3x3 ``w`` given as ``winograd_filters(w)``, for inference
    (the filters are a constant made from ``w``; :class:`TunedConv2d` runs the plain convolution when
    gradients are wanted).

    ``x`` is (N, C, H, W) in any layout; the result is (N, K, H, W) in channels-last memory."""
    n, c, h, w = x.shape
    k = filters.shape[-1]
    bt, at = tile_transforms(x.dtype, x.device)
    th, tw = -(-h // OUT), -(-w // OUT)
    # NHWC, padded by the convolution's 1 plus what completes the last tile.
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, OUT * tw + 1 - w, 1, OUT * th + 1 - h))
    tiles = padded.unfold(1, TILE, OUT).unfold(2, TILE, OUT)  # (N, th, tw, C, 6, 6), overlapping views
    d = tiles.permute(4, 5, 0, 1, 2, 3).reshape(TILE * TILE, -1)  # (36, N*th*tw*C): one gather
    v = torch.mm(bt, d).view(TILE * TILE, n * th * tw, c)
    m = torch.bmm(v, filters)  # (36, tiles, K): the channel contraction, one GEMM per tile position
    y = torch.mm(at, m.view(TILE * TILE, -1)).view(OUT, OUT, n, th, tw, k).permute(2, 3, 0, 4, 1, 5)
    out = x.new_empty((n, th, OUT, tw, OUT, k))
    if bias is None:
        out.copy_(y)
    else:
        torch.add(y, bias, out=out)  # the bias rides on the copy back to NHWC order
    out = out.view(n, th * OUT, tw * OUT, k)
    if (th * OUT, tw * OUT) != (h, w):
        out = out[:, :h, :w].contiguous()
    return out.permute(0, 3, 1, 2)


def map_matrix(conv: nn.Conv2d, h: int, w: int) -> torch.Tensor:
    """(H*W*C, H*W*K): ``conv`` on an HxW map as one matrix on NHWC-flattened images (no bias).
    Built by running the convolution on each basis image, so every entry is one weight or zero."""
    c = conv.in_channels
    eye = torch.eye(h * w * c, dtype=conv.weight.dtype, device=conv.weight.device)
    basis = eye.view(h * w * c, h, w, c).permute(0, 3, 1, 2)
    with torch.no_grad():
        cols = F.conv2d(basis, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    return cols.permute(0, 2, 3, 1).reshape(h * w * c, -1).contiguous()


def map_conv(x: torch.Tensor, matrix: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv(x)`` as ``x`` flattened NHWC times ``map_matrix`` (+ ``bias``: the conv's bias, or it
    already repeated for every pixel); result (N, K, H, W) in channels-last memory. ``x`` is read in
    place when it is already channels-last."""
    n, _, h, w = x.shape
    flat = x.permute(0, 2, 3, 1).reshape(n, -1)
    if bias is not None and bias.numel() != matrix.shape[1]:
        bias = bias.repeat(h * w)
    y = torch.mm(flat, matrix) if bias is None else torch.addmm(bias, flat, matrix)
    return y.view(n, h, w, -1).permute(0, 3, 1, 2)


def pick(times: dict[str, float], margin: float = MARGIN) -> str:
    """The algorithm to keep from measured seconds: the fastest alternative when it beat ``direct``
    by at least ``margin`` (a fraction of direct's time), else ``direct``."""
    if "direct" not in times:
        raise ValueError(f"pick needs the direct convolution's time, got {sorted(times)}")
    alts = {a: t for a, t in times.items() if a != "direct"}
    if not alts:
        return "direct"
    best = min(alts, key=alts.get)
    return best if alts[best] <= times["direct"] * (1 - margin) else "direct"


def eligible(conv: nn.Module) -> bool:
    """A plain 3x3, stride-1, padding-1 convolution (no groups or dilation, zero padding)."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


class TunedConv2d(nn.Conv2d):
    """A 3x3 convolution that runs as whichever of ``direct``/``winograd``/``map`` was fastest for
    each input shape (see the module doc); ``algo`` forces one (``map`` falls back to ``direct`` on
    maps above ``MAP_MAX_PIXELS`` pixels). Still a ``Conv2d`` sharing ``conv``'s weight and bias (same
    state-dict keys). The transformed filters are made on first use and remade when the weight is
    replaced or changed in place through autograd's version counter (``mul_``, ``copy_``, also under
    ``no_grad``); a change through ``.data`` bypasses that counter: call :meth:`invalidate` after one.
    Weights made in inference mode have no counter, so nothing is cached for them."""

    def __init__(self, conv: nn.Conv2d, algo: str = "auto"):
        if not eligible(conv):
            raise ValueError(f"TunedConv2d takes a plain 3x3 stride-1 padding-1 Conv2d, got {conv}")
        if algo != "auto" and algo not in ALGOS:
            raise ValueError(f"algo={algo!r}: use auto or one of {', '.join(ALGOS)}")
        # Built on the meta device (nothing allocated), then given conv's own parameters.
        super().__init__(conv.in_channels, conv.out_channels, 3, padding=1, bias=conv.bias is not None, device="meta")
        self.weight, self.bias = conv.weight, conv.bias
        self.train(conv.training)
        self.algo = algo
        self.choice: dict[tuple, str] = {}  # input shape -> algorithm
        self.tune_ms: dict[tuple, dict[str, float]] = {}  # input shape -> fastest ms of each algorithm
        self.reused: set[tuple] = set()  # shapes whose choice came from another layer of the same geometry
        self._cache: dict = {}  # derived tensors, keyed by what they were made from

    def _fast_path(self, x: torch.Tensor) -> bool:
        wt = self.weight
        bias_grad = self.bias is not None and self.bias.requires_grad
        grads = torch.is_grad_enabled() and (x.requires_grad or wt.requires_grad or bias_grad)
        return (not grads and x.dim() == 4 and x.device.type == "cpu" and x.dtype == torch.float32
                and wt.dtype == torch.float32 and wt.device.type == "cpu")

    def _derived(self, name, make, source: torch.Tensor | None = None):
        """``make()``, cached until ``source`` (default: the weight) is replaced or changed in place."""
        src = self.weight if source is None else source
        try:
            version = src._version
        except RuntimeError:  # an inference-mode tensor has no version counter: a change would go unseen
            return make()
        key = (name, src.data_ptr(), version)
        if key not in self._cache:
            self._cache = {k: v for k, v in self._cache.items() if k[0] != name}
            self._cache[key] = make()
        return self._cache[key]

    def invalidate(self) -> None:
        """Forget the transformed filters (after changing the weight through ``.data``)."""
        self._cache = {}

    def run(self, algo: str, x: torch.Tensor) -> torch.Tensor:
        """``conv(x)`` computed by ``algo``."""
        bias = self.bias
        if algo == "winograd":
            y = winograd_conv3x3(x, self._derived("filters", lambda: winograd_filters(self.weight)), bias)
        elif algo == "map" and x.shape[-2] * x.shape[-1] <= MAP_MAX_PIXELS:
            h, w = x.shape[-2:]
            y = map_conv(x, self._derived(("map", h, w), lambda: map_matrix(self, h, w)),
                         None if bias is None else self._derived(("bias", h, w), lambda: bias.detach().repeat(h * w), bias))
        else:
            return super().forward(x)
        # Both write NHWC; an NCHW caller gets NCHW back, so later layers keep the form's layout.
        return y if x.is_contiguous(memory_format=torch.channels_last) else y.contiguous()

    def _tune(self, x: torch.Tensor, key: tuple) -> str:
        geometry = (*key, self.out_channels, self.bias is not None)
        if geometry in _DECISIONS:  # the same layer shape was timed already in this process
            choice, ms = _DECISIONS[geometry]
            self.choice[key], self.tune_ms[key] = choice, dict(ms)
            self.reused.add(key)
            return choice
        algos = ["direct", "winograd"] + (["map"] if x.shape[-2] * x.shape[-1] <= MAP_MAX_PIXELS else [])
        for algo in algos:  # untimed: builds the derived tensors and warms the caches
            self.run(algo, x)
        best = {algo: float("inf") for algo in algos}
        for round_ in range(TUNE_ROUNDS):
            if round_:  # after the first timed round, stop timing what ran at half direct's speed or worse
                algos = [a for a in algos if a == "direct" or best[a] < 2 * best["direct"]]
            for algo in algos:
                t0 = time.perf_counter()
                self.run(algo, x)
                best[algo] = min(best[algo], time.perf_counter() - t0)
        self.tune_ms[key] = {a: round(t * 1e3, 3) for a, t in best.items()}
        choice = self.choice[key] = pick(best)
        _DECISIONS[geometry] = (choice, dict(self.tune_ms[key]))
        kept = set(self.choice.values())
        # Drop what no tuned shape uses (the Winograd filters take 4x the weights' memory).
        self._cache = {k: v for k, v in self._cache.items()
                       if ("winograd" if k[0] == "filters" else "map") in kept}
        return choice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fast_path(x):
            return super().forward(x)
        if self.algo != "auto":
            return self.run(self.algo, x)
        key = self.shape_key(x)
        algo = self.choice.get(key)
        if algo is None:
            algo = self._tune(x, key)
        return self.run(algo, x)

    @staticmethod
    def shape_key(x: torch.Tensor) -> tuple:
        """What a choice is made for: the input shape, its layout and the threads the kernels get."""
        return (*x.shape, "nhwc" if x.is_contiguous(memory_format=torch.channels_last) else "nchw",
                torch.get_num_threads())

    def extra_repr(self) -> str:
        return super().extra_repr() + f", algo={self.algo}" + (f", choice={self.choice}" if self.choice else "")


def clear_decisions() -> None:
    """Forget every choice made in this process (the next batch of each shape is timed again)."""
    _DECISIONS.clear()


def tune_convs(net: nn.Module, algo: str = "auto") -> int:
    """Wrap every eligible ``Conv2d`` of ``net`` (in place) in a :class:`TunedConv2d`; returns how many."""
    count = 0
    for name, m in list(net.named_modules()):
        if eligible(m):
            replace_module(net, name, TunedConv2d(m, algo))
            count += 1
    return count


def tune_record(net: nn.Module) -> list[dict]:
    """Per tuned layer and shape: the input shape, the milliseconds each algorithm took, the choice, and
    whether it was reused from an earlier layer of the same geometry."""
    return [{"layer": name, "input": list(key[:4]), "layout": key[4], "threads": key[5], "ms": m.tune_ms[key],
             "choice": m.choice[key], "reused": key in m.reused}
            for name, m in net.named_modules() if isinstance(m, TunedConv2d) for key in m.tune_ms]


def conv_algos(net: nn.Module) -> dict[int, dict[str, int]]:
    """{batch size: {algorithm: layers}} over the shapes each ``TunedConv2d`` of ``net`` has tuned."""
    out: dict[int, dict[str, int]] = {}
    for r in tune_record(net):
        counts = out.setdefault(r["input"][0], {})
        counts[r["choice"]] = counts.get(r["choice"], 0) + 1
    return dict(sorted(out.items()))
