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

``fold_for_training`` / ``unfold_after_training`` train the same network in the folded form
(``model.fold_classifier``): the 49 column blocks of ``classifier[0]`` receive the same gradient at
32x32 input, so SGD on the full weight moves only their sum, and training that sum with its
gradient step scaled by 49 and its weight decay by 1/49 is the same trajectory (momentum and
Nesterov are linear) at a quarter of the parameters: a VGG16 bf16 training step on the 2-core CPU
took 0.87 s instead of 1.5 s. Unfolding spreads the sum evenly over the blocks.

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


VGG_DOWNSAMPLING = 32  # VGG's five 2x2 max pools: a feature map 1/32 of the input, rounded down


def data_image_size(cfg) -> int:
    """The side of the run's training images: ``data.image_size`` where the data group has one
    (class folders), else CIFAR-10's (and the synthetic set's) 32."""
    data = cfg.get("data") or {}
    return int(data.get("image_size", INPUT_SIZE[0]) or INPUT_SIZE[0])


def fold_training_problem(arch: str, image_size: int) -> str | None:
    """Why ``model.fold_classifier`` cannot train ``arch`` on ``image_size`` images exactly, or None.
    A pure rule (no network built): VGG only, and only where the features end at 1x1."""
    if not str(arch).startswith("vgg"):
        return f"model.arch={arch} has no VGG pool-and-classifier to fold"
    side = int(image_size) // VGG_DOWNSAMPLING
    if side != 1:
        return (f"{image_size}x{image_size} images end VGG's features at {side}x{side}, not 1x1, so the pool "
                "averages instead of replicating")
    return None


class OneByOnePool(nn.Module):
    """The folded network's pool: passes a 1x1 feature map through (the folded ``classifier[0]`` takes
    its C values) and refuses any other, where the fold would silently compute something else."""

    def __init__(self, output_size):
        super().__init__()
        self.output_size = output_size  # the pool it stands for, restored by unfold_after_training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (1, 1):
            raise RuntimeError(f"model.fold_classifier=true needs a 1x1 feature map before the classifier, got "
                               f"{tuple(x.shape[-2:])}: train on 32x32 images or set model.fold_classifier=false")
        return x


def fold_for_training(net: nn.Module) -> int:
    """Fold ``net`` (a VGG) in place for training: ``avgpool`` becomes a :class:`OneByOnePool` and
    ``classifier[0]`` a Linear(C, out) holding the sum of its column blocks. Returns the number of
    blocks (49 for VGG's 7x7 pool): the factor the optimiser scales that weight's step by. Checks
    the 1x1 rule on a 32x32 probe; a batch of another size is refused by the pool."""
    pool = net.avgpool
    out_hw = tuple(_pair(pool.output_size))
    copies = (out_hw[0] or 1) * (out_hw[1] or 1)
    folded_fc = _folded_linear(net, INPUT_SIZE)
    net.classifier[0] = folded_fc
    net.avgpool = OneByOnePool(pool.output_size)
    return copies


def spread_folded(weight: torch.Tensor, copies: int) -> torch.Tensor:
    """A folded ``classifier[0]`` weight (out x C) spread evenly over its ``copies`` column blocks
    (out x C*copies, channel-major as VGG flattens CxHxW): the same function where the pool replicates."""
    return weight.repeat_interleave(copies, dim=1) / copies


def unfold_after_training(net: nn.Module) -> None:
    """Undo :func:`fold_for_training` in place: ``classifier[0]`` back to Linear(C x blocks, out), each
    block a 1/blocks share of the trained sum (the same outputs at 32x32, torchvision's shapes and
    keys), and the pool back. A network that is not folded is left as it is."""
    pool = net.avgpool
    if not isinstance(pool, OneByOnePool):
        return
    out_hw = tuple(_pair(pool.output_size))
    copies = (out_hw[0] or 1) * (out_hw[1] or 1)
    fc = net.classifier[0]
    full = nn.Linear(fc.in_features * copies, fc.out_features, bias=fc.bias is not None,
                     device=fc.weight.device, dtype=fc.weight.dtype)
    with torch.no_grad():
        full.weight.copy_(spread_folded(fc.weight.detach(), copies))
        if fc.bias is not None:
            full.bias.copy_(fc.bias.detach())
    net.classifier[0] = full.train(fc.training)
    net.avgpool = ReplicatingAdaptiveAvgPool2d(pool.output_size)


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
