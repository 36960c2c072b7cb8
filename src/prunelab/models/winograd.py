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
per layer and per input shape (and layout and thread count) by timing each on the first batch of that
shape, keeping an alternative only when it beat the direct convolution by ``MARGIN``; the choices are
shared within the process by layer geometry (:mod:`prunelab.models.tuning`). Alternatives return the
input's layout. It runs the plain convolution whenever the input is not float32 on the CPU or
gradients are wanted. Winograd's intermediates live in per-thread :func:`scratch` buffers reused from
call to call; the small-map matrix is prepacked for oneDNN where it can be (:mod:`prunelab.models.packed`).
"""

from __future__ import annotations

import functools
import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

from prunelab.models import packed, tuning
from prunelab.models.rewrite import replace_module
from prunelab.models.tuning import MARGIN, Tuned, algo_counts_by_batch, clear_decisions, pick  # noqa: F401

ALGOS = ("direct", "winograd", "map")
MAP_MAX_PIXELS = 4  # (HW)^2 multiplies per channel pair against direct's 9 HW: fewer only while HW < 9
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


_SCRATCH = threading.local()  # per thread: {(slot, dtype, device): flat tensor}, grown to the largest need


def scratch(slot: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable ``shape`` buffer for a layer's intermediate (never a result handed back): one per slot,
    thread, dtype and device, grown to the largest request and kept. Large fresh tensors cost a page
    fault per 4 KiB page on every call (glibc maps allocations over 32 MiB anew each time); on VGG16's
    16x16 and 32x32 maps at batch 128 that was half of Winograd's time (AVX2 EPYC, 2026-11-28).
    ``free_scratch`` gives the memory back."""
    pool = getattr(_SCRATCH, "pool", None)
    if pool is None:
        pool = _SCRATCH.pool = {}
    numel = math.prod(shape)
    key = (slot, dtype, device)
    buf = pool.get(key)
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):  # an inference tensor could not be written outside inference mode
            buf = pool[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(shape)


def free_scratch() -> None:
    """Release this thread's Winograd buffers (they are remade on the next Winograd call)."""
    _SCRATCH.pool = {}


def winograd_conv3x3(x: torch.Tensor, filters: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv2d(x, w, bias, padding=1)`` for a 3x3 ``w`` given as ``winograd_filters(w)``, for inference
    (the filters are a constant made from ``w``; :class:`TunedConv2d` runs the plain convolution when
    gradients are wanted). Intermediates live in this thread's :func:`scratch` buffers.

    ``x`` is (N, C, H, W) in any layout; the result is (N, K, H, W) in channels-last memory."""
    n, c, h, w = x.shape
    k = filters.shape[-1]
    dtype, device = x.dtype, x.device
    bt, at = tile_transforms(dtype, device)
    th, tw = -(-h // OUT), -(-w // OUT)
    tiles_n = n * th * tw
    # NHWC, padded by the convolution's 1 plus what completes the last tile; the border is zeroed on
    # every call because the buffer is shared with other layers.
    hp, wp = OUT * th + 2, OUT * tw + 2
    padded = scratch("padded", (n, hp, wp, c), dtype, device)
    padded[:, 0].zero_()
    padded[:, h + 1:].zero_()
    padded[:, 1:h + 1, 0].zero_()
    padded[:, 1:h + 1, w + 1:].zero_()
    padded[:, 1:h + 1, 1:w + 1].copy_(x.permute(0, 2, 3, 1))
    tiles = padded.unfold(1, TILE, OUT).unfold(2, TILE, OUT)  # (N, th, tw, C, 6, 6), overlapping views
    d = scratch("a", (TILE, TILE, n, th, tw, c), dtype, device)
    d.copy_(tiles.permute(4, 5, 0, 1, 2, 3))  # (36, N*th*tw*C): one gather
    v = scratch("b", (TILE * TILE, tiles_n, c), dtype, device)
    torch.mm(bt, d.view(TILE * TILE, -1), out=v.view(TILE * TILE, -1))
    m = scratch("c", (TILE * TILE, tiles_n, k), dtype, device)
    torch.bmm(v, filters, out=m)  # the channel contraction, one GEMM per tile position
    y = scratch("a", (OUT * OUT, tiles_n * k), dtype, device)  # d is spent: its buffer takes the outputs
    torch.mm(at, m.view(TILE * TILE, -1), out=y)
    y = y.view(OUT, OUT, n, th, tw, k).permute(2, 3, 0, 4, 1, 5)
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
    place when it is already channels-last. ``matrix`` may also be its transpose prepacked by
    :func:`prunelab.models.packed.pack_weight` (a oneDNN tensor): then oneDNN's GEMM runs on it."""
    n, _, h, w = x.shape
    flat = x.permute(0, 2, 3, 1).reshape(n, -1)
    outputs = matrix.shape[0] if matrix.is_mkldnn else matrix.shape[1]
    if bias is not None and bias.numel() != outputs:
        bias = bias.repeat(h * w)
    if matrix.is_mkldnn:
        y = packed.linear(flat, matrix, bias)
    else:
        y = torch.mm(flat, matrix) if bias is None else torch.addmm(bias, flat, matrix)
    return y.view(n, h, w, -1).permute(0, 3, 1, 2)


def eligible(conv: nn.Module) -> bool:
    """A plain 3x3, stride-1, padding-1 convolution (no groups or dilation, zero padding)."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


class TunedConv2d(Tuned, nn.Conv2d):
    """A 3x3 convolution that runs as whichever of ``direct``/``winograd``/``map`` was fastest for
    each input shape (see the module doc and :mod:`prunelab.models.tuning`); ``algo`` forces one
    (``map`` falls back to ``direct`` on maps above ``MAP_MAX_PIXELS`` pixels). Still a ``Conv2d``
    sharing ``conv``'s weight and bias (same state-dict keys); call :meth:`invalidate` after changing
    the weight through ``.data``."""

    BASE, ALGOS = "direct", ALGOS

    def __init__(self, conv: nn.Conv2d, algo: str = "auto", pack: bool = True):
        if not eligible(conv):
            raise ValueError(f"TunedConv2d takes a plain 3x3 stride-1 padding-1 Conv2d, got {conv}")
        # Built on the meta device (nothing allocated), then given conv's own parameters.
        super().__init__(conv.in_channels, conv.out_channels, 3, padding=1, bias=conv.bias is not None, device="meta")
        self.weight, self.bias = conv.weight, conv.bias
        self.train(conv.training)
        self.pack = pack  # the small-map matrix prepacked for oneDNN where it can be
        self._init_tuning(algo)

    def geometry(self) -> tuple:
        return self.out_channels, self.bias is not None, self.pack and packed.available()

    def candidates(self, x: torch.Tensor) -> list[str]:
        return ["direct", "winograd"] + (["map"] if x.shape[-2] * x.shape[-1] <= MAP_MAX_PIXELS else [])

    def uses(self, cache_key) -> str:
        return "winograd" if cache_key[0] == "filters" else "map"

    def run(self, algo: str, x: torch.Tensor) -> torch.Tensor:
        """``conv(x)`` computed by ``algo``."""
        bias = self.bias
        if algo == "winograd":
            y = winograd_conv3x3(x, self._derived("filters", lambda: winograd_filters(self.weight)), bias)
        elif algo == "map" and x.shape[-2] * x.shape[-1] <= MAP_MAX_PIXELS:
            h, w = x.shape[-2:]
            rep = None if bias is None else self._derived(("bias", h, w), lambda: bias.detach().repeat(h * w), bias)
            # Where it can be, the matrix is laid out once for oneDNN's GEMM, not on every call.
            pack = self.pack and packed.available()
            y = map_conv(x, self._derived(("map", h, w, pack), lambda: packed.pack_weight(map_matrix(self, h, w).t())
                                          if pack else map_matrix(self, h, w)), rep)
        else:
            return nn.Conv2d.forward(self, x)
        # Both write NHWC; an NCHW caller gets NCHW back, so later layers keep the form's layout.
        return y if x.is_contiguous(memory_format=torch.channels_last) else y.contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or not self._fast_path(x):
            return nn.Conv2d.forward(self, x)
        return self.tuned_forward(x)

    def extra_repr(self) -> str:
        return nn.Conv2d.extra_repr(self) + f", algo={self.algo}" + (f", choice={self.choice}" if self.choice else "")


def tune_convs(net: nn.Module, algo: str = "auto", pack: bool = True) -> int:
    """Wrap every eligible ``Conv2d`` of ``net`` (in place) in a :class:`TunedConv2d`; returns how many.
    ``pack``: the small-map matrix may be prepacked for oneDNN."""
    count = 0
    for name, m in list(net.named_modules()):
        if eligible(m):
            replace_module(net, name, TunedConv2d(m, algo, pack))
            count += 1
    return count


def tune_record(net: nn.Module) -> list[dict]:
    """:func:`prunelab.models.tuning.tune_record` of the :class:`TunedConv2d` layers only."""
    return tuning.tune_record(net, TunedConv2d)


def conv_algos(net: nn.Module) -> dict[int, dict[str, int]]:
    """{batch size: {algorithm: layers}} over the shapes each ``TunedConv2d`` of ``net`` has tuned."""
    return algo_counts_by_batch(net, TunedConv2d)
