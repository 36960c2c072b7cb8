"""Exact rewrites of a trained network: the same function, a faster form.

At 32x32 input VGG's features end at 512x1x1, so ``AdaptiveAvgPool2d((7, 7))`` only copies each
value 49 times and ``classifier[0]`` can absorb the copies (its 49 weight columns per channel
summed): VGG16 shrinks from 134M to 34M parameters with the same outputs up to float rounding.
``fold_pool`` makes a folded copy (export, deployment); ``folded_view`` shares every module but
the folded Linear (cheap enough to build per search candidate). Both refuse where the fold is
not exact, naming the feature-map size.

``ReplicatingAdaptiveAvgPool2d`` is VGG's pool for training: the same outputs and gradients, but on a
1x1 map it replicates by ``expand``, whose backward is a plain sum, instead of CUDA's atomic
adaptive-pool backward (76% of a VGG16 bf16 training step on an H100, 2026-11-27).

``memory_format`` is the one reading of the ``channels_last`` setting.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from prunelab.models.modes import eval_mode

INPUT_SIZE = (32, 32)


def memory_format(channels_last: bool) -> torch.memory_format:
    """The layout a network and its batches use: NHWC (channels-last) or NCHW."""
    return torch.channels_last if channels_last else torch.contiguous_format


class ReplicatingAdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    """``AdaptiveAvgPool2d`` that, on a 1x1 map, copies the input to the output size: each output
    cell averages that one value, so this is exact in every dtype, and its backward sums the
    gradient over the copies (a reduction, deterministic) where CUDA's adaptive-pool backward
    scatters it with atomics (14.8 ms of a 19.7 ms VGG16 bf16 step at batch 128 on an H100). Any
    other input runs the ordinary pool. The output is a new tensor, as the pool's is (the flatten
    after it would copy it anyway). The size test is Python control flow: torch.fx symbolic tracing
    and TorchScript cannot script it (prunelab uses neither; torch.compile and ONNX export handle it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = tuple(_pair(self.output_size))
        # (1, 1) out of (1, 1) is the identity: the ordinary pool, whose backward is a plain copy, keeps it
        if x.dim() in (3, 4) and x.shape[-2:] == (1, 1) and None not in out and out != (1, 1):
            return x.expand(*x.shape[:-2], *out).contiguous()
        return super().forward(x)


def replace_module(net: nn.Module, dotted: str, new: nn.Module) -> None:
    """Put ``new`` where ``net``'s submodule named ``dotted`` (e.g. ``features.3``) is."""
    parent_name, _, child = dotted.rpartition(".")
    setattr(net.get_submodule(parent_name) if parent_name else net, child, new)


def replicating_pools(net: nn.Module) -> nn.Module:
    """``net`` (changed in place and returned) with every plain ``AdaptiveAvgPool2d`` swapped for a
    :class:`ReplicatingAdaptiveAvgPool2d` of the same output size (no parameters: state dicts,
    ``isinstance`` checks and pool folding are unaffected)."""
    for name, m in list(net.named_modules()):
        if type(m) is nn.AdaptiveAvgPool2d:
            replace_module(net, name, ReplicatingAdaptiveAvgPool2d(m.output_size))
    return net


def _features_shape(model: nn.Module, input_size: tuple[int, int]) -> torch.Size:
    first = next(m for m in model.features.modules() if isinstance(m, nn.Conv2d))
    with eval_mode(model), torch.no_grad():
        x = torch.zeros(1, first.in_channels, *input_size, device=first.weight.device, dtype=first.weight.dtype)
        return model.features(x).shape[1:]


def _folded_linear(model: nn.Module, input_size: tuple[int, int]) -> nn.Linear:
    """``classifier[0]`` with its 49 (or HxW) column blocks summed: the Linear(C, out) that gives
    the same outputs once the pool only replicates a CxHxW = Cx1x1 feature map."""
    for attr in ("features", "avgpool", "classifier"):
        if not hasattr(model, attr):
            raise ValueError(f"fold_pool needs a VGG-like model with .{attr}; {type(model).__name__} has none")
    pool, fc = model.avgpool, model.classifier[0]
    if not isinstance(pool, nn.AdaptiveAvgPool2d):
        raise ValueError(f"fold_pool needs avgpool to be AdaptiveAvgPool2d, found {type(pool).__name__} (already folded?)")
    if not isinstance(fc, nn.Linear):
        raise ValueError(f"fold_pool needs classifier[0] to be a Linear, found {type(fc).__name__}")
    c, h, w = _features_shape(model, input_size)
    if (h, w) != (1, 1):
        raise ValueError(f"cannot fold the average pool: at {input_size[0]}x{input_size[1]} input the features end at "
                         f"{c}x{h}x{w}, not {c}x1x1, so AdaptiveAvgPool2d averages instead of replicating")
    out_hw = pool.output_size if isinstance(pool.output_size, tuple) else (pool.output_size, pool.output_size)
    copies = (out_hw[0] or 1) * (out_hw[1] or 1)
    if fc.in_features != c * copies:
        raise ValueError(f"classifier[0] takes {fc.in_features} inputs, expected {c} channels x {copies} pooled positions")
    folded_fc = nn.Linear(c, fc.out_features, bias=fc.bias is not None, device=fc.weight.device, dtype=fc.weight.dtype)
    with torch.no_grad():
        folded_fc.weight.copy_(fc.weight.detach().view(fc.out_features, c, copies).sum(-1))
        if fc.bias is not None:
            folded_fc.bias.copy_(fc.bias.detach())
    return folded_fc.train(fc.training)


def fold_pool(model: nn.Module, input_size: tuple[int, int] = INPUT_SIZE) -> nn.Module:
    """A copy of a VGG with ``avgpool`` removed and ``classifier[0]`` shrunk to take C inputs.

    Exact only when the features end at Cx1x1 for ``input_size`` (then the pool replicates);
    otherwise raises ValueError naming the feature-map size. Works for channel-pruned VGGs too.
    """
    fc = model.classifier[0] if hasattr(model, "classifier") else None
    folded_fc = _folded_linear(model, input_size)
    # Pre-seeding the memo keeps deepcopy from duplicating the big Linear we are replacing
    # (VGG16's classifier[0] is 103M of its 134M parameters).
    folded = copy.deepcopy(model, {id(fc): nn.Identity()})
    folded.avgpool = nn.Identity()  # forward() still flattens: (N, C, 1, 1) -> (N, C)
    folded.classifier[0] = folded_fc
    return folded


def folded_copy(model: nn.Module, input_size: tuple[int, int] = INPUT_SIZE,
                fold: bool = True) -> tuple[nn.Module, tuple[int, int] | None, list[str]]:
    """(a copy of ``model`` with its pool folded where that is exact, the input size it is folded
    for or None, a note saying why not): what every served form starts from."""
    if not fold:
        return copy.deepcopy(model), None, ["pool not folded: fold=False"]
    try:
        return fold_pool(model, input_size), tuple(input_size), []
    except ValueError as exc:
        return copy.deepcopy(model), None, [f"pool not folded: {exc}"]


def folded_view(model: nn.Module, input_size: tuple[int, int] = INPUT_SIZE) -> nn.Module:
    """The same function as ``model`` with the pool folded, sharing every module but
    ``classifier[0]`` (a new Linear(C, out) from its current values): a cheap way to evaluate
    a masked candidate, ~1.5x faster on VGG16 at 32x32 (the 25,088-wide GEMM becomes 512-wide).
    Predictions match up to float rounding. Raises ValueError where :func:`fold_pool` would."""
    folded_fc = _folded_linear(model, input_size)
    return nn.Sequential(model.features, nn.Flatten(1), folded_fc, *list(model.classifier)[1:]).train(model.training)


class ConvReLU(nn.Module):
    """``relu(conv(x))`` as one cuDNN call (CUDA only): the activation is applied as the convolution
    writes its output, so the feature map is not read and written a second time by a ReLU kernel.
    For deploy forms: hooks on the wrapped conv do not run, and the call is outside
    ``torch.use_deterministic_algorithms``' reach."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        return torch.cudnn_convolution_relu(x, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups)


def fuse_conv_relu(model: nn.Module, inplace: bool = False) -> nn.Module:
    """``model`` (a copy, or itself when ``inplace``) with every ``Conv2d`` directly followed by a
    ``ReLU`` in an ``nn.Sequential`` replaced by one :class:`ConvReLU` (the ReLU by ``Identity``, so
    the other layers keep their indices). Same function; CUDA (cuDNN) only."""
    if not inplace:
        model = copy.deepcopy(model)
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            conv, act = seq[i], seq[i + 1]
            plain = isinstance(conv, nn.Conv2d) and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)
            if plain and isinstance(act, nn.ReLU):
                seq[i], seq[i + 1] = ConvReLU(conv), nn.Identity()
    return model
