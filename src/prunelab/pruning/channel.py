"""Structured filter pruning: remove whole Conv2d output channels and everything tied to them.

Ranking is ours, surgery is Torch-Pruning's. Every output filter of every prunable conv gets one
score (the L1 or L2 norm of its weights, or its first-order Taylor term on training images:
``pruning.taylor``; optionally divided by its layer's mean) and the
``round(ratio * total)`` lowest scores across the whole network are removed (``scope="layerwise"``:
the ``round(ratio * n)`` lowest of each n-wide conv), except that a layer never drops below
``min_channels``; with ``round_to > 1`` each layer's width is then rounded to
a multiple of it (fast kernel widths). Torch-Pruning's dependency graph then deletes each chosen filter together with
its bias, the BatchNorm entries after it, the matching input channels of the next conv and, for
the last conv of a VGG, the 49 input features per channel of ``classifier[0]``.

A conv is prunable only when its output channels are its own: if removing them would also remove
output channels of another Conv2d/Linear (residual adds, depthwise convs) or touch the
classification head, it is left whole. On VGG that is every conv; on ResNet-18 it is the first
conv of each block. With ``linears=True`` the hidden units of the classifier's Linear layers are
ranked and removed by the same rule (every Linear but the head, whose outputs are the classes;
the head loses the matching inputs): VGG16's two 4,096-wide layers are about a tenth of a
channel-pruned model's multiply-adds at 32x32. With ``linears=p`` (a number) each hidden layer
instead keeps ``(1 - ratio) ** p`` of its units, its own weakest rows going: the convs' kept share
to the power p, which composes across iterative steps as the share itself does. Removing a channel is exact, not approximate: a
filter whose weights and bias are zero feeds ReLU a zero, so the pruned network computes what the
masked dense one computes.

Pruned models are saved as plain tensors plus a JSON of the layer shapes (``channel_files``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from prunelab.models.factory import last_linear_name
from prunelab.pruning.channel_graph import (
    Layer,
    build_graph,
    coupling,
    default_example,
    out_fn,
    prunable_convs,
    width,
)
from prunelab.pruning.costs import channel_costs, count_macs
from prunelab.pruning.masks import count_to_prune, prunable_weights
from prunelab.pruning.registry import IMPORTANCES, NORMALIZATIONS
from prunelab.pruning.taylor import Calibration

# The code's defaults are the config's (conf/prune/options/channel.yaml; a test holds them equal).
DEFAULT_NORMALIZE = "mean"
DEFAULT_ROUND_TO = 16


def filter_importance(conv: nn.Module, importance: str = "l1") -> torch.Tensor:
    """One score per output filter (a Linear's: per unit, its row): the L1 or L2 norm of its
    weights (Taylor needs data: ``rank_channels``)."""
    if importance not in ("l1", "l2"):
        raise ValueError(f"a filter's norm is l1 or l2, got {importance!r}")
    w = conv.weight.detach().flatten(1).float()
    return w.abs().sum(1) if importance == "l1" else w.pow(2).sum(1).sqrt()


class ChannelRanking:
    """All filters of all prunable convs in one ascending order, sorted once per model.

    Ties are broken by layer order then channel index (a stable sort), so a plan is reproducible.
    """

    def __init__(self, scores: Mapping[str, torch.Tensor], apart: Mapping[str, float] | None = None):
        self.sizes = {name: int(s.numel()) for name, s in scores.items()}
        # layers outside the ratio's count, each keeping (1 - ratio) ** exponent of itself (linears=p)
        self.apart = dict(apart or {})
        names = list(scores)
        if not names:
            self.order: list[tuple[str, int]] = []
            return
        flat = torch.cat([s.reshape(-1).cpu() for s in scores.values()])
        layer = torch.cat([torch.full((n,), i) for i, n in enumerate(self.sizes.values())])
        channel = torch.cat([torch.arange(n) for n in self.sizes.values()])
        idx = torch.sort(flat, stable=True).indices
        self.order = [(names[int(layer[i])], int(channel[i])) for i in idx]

    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    def plan(self, ratio: float, min_channels: int = 1, round_to: int = 1,
             layerwise: bool = False, kept: Mapping[str, int] | None = None) -> dict[str, list[int]]:
        """Removed channel indices per conv at ``ratio``: the lowest-ranked ones the floors allow.

        Global (the default): the ``round(ratio * total)`` lowest across the network. ``layerwise``:
        ``round(ratio * n)`` of each n-wide conv, its own lowest-ranked (every layer loses the
        same share; how the layers compare does not matter). A layer in ``apart`` loses its own
        share, ``1 - (1 - ratio) ** exponent`` (or down to ``kept[name]`` units where ``kept`` names
        it: an iterative step's target), and is left out of the global count. When the floors leave fewer removable
        channels than that, every removable one goes (the floors win over the ratio). With ``round_to > 1`` each layer
        then keeps the multiple of ``round_to`` nearest to what the global ranking left it
        (never fewer than ``round_to`` nor ``min_channels``), dropping its own lowest-ranked
        channels: widths such as 64 or 256 run at full SIMD width, 61 or 203 do not. The total
        removed then differs from the ratio by at most ``round_to / 2`` per layer;
        :func:`removed_fraction` gives the exact figure.
        """
        if min_channels < 1:
            raise ValueError(f"min_channels must be >= 1 (a conv with no channels cuts the network), got {min_channels}")
        if round_to < 1:
            raise ValueError(f"round_to must be >= 1, got {round_to}")
        own = {name: 1.0 - (1.0 - ratio) ** p for name, p in self.apart.items()}
        k = count_to_prune(sum(n for name, n in self.sizes.items() if name not in own), ratio)
        room = {name: max(0, n - min_channels) for name, n in self.sizes.items()}
        removed: dict[str, list[int]] = {name: [] for name in self.sizes}
        by_layer: dict[str, list[int]] = {name: [] for name in self.sizes}
        quota = {name: min(room[name], count_to_prune(n, own.get(name, ratio))) if layerwise or name in own
                 else room[name] for name, n in self.sizes.items()}
        for name, k_kept in (kept or {}).items():
            quota[name] = min(room[name], max(0, self.sizes[name] - k_kept))
        taken = 0
        for name, ch in self.order:
            by_layer[name].append(ch)  # each layer's channels, lowest-ranked first
            alone = layerwise or name in own
            if (alone or taken < k) and len(removed[name]) < quota[name]:
                removed[name].append(ch)
                taken += name not in own
        if round_to > 1:
            for name, n in self.sizes.items():
                # A layer the ranking left whole stays whole: rounding only settles how many go.
                if n <= round_to or not removed[name]:
                    continue
                floor = -(-min_channels // round_to) * round_to
                kept = round_to * math.floor((n - len(removed[name])) / round_to + 0.5)
                kept = min(n, max(kept, floor, round_to))
                removed[name] = by_layer[name][: n - kept]
        return {name: sorted(idxs) for name, idxs in removed.items()}


def removed_fraction(channels: Mapping[str, int], original: Mapping[str, int]) -> float:
    """Fraction of the original prunable channels that are gone (convs absent from ``original`` ignored)."""
    total = sum(original.values())
    return sum(original[n] - channels[n] for n in original) / total if total else 0.0


def rank_channels(model: nn.Module, importance: str = "l1", example_input: torch.Tensor | None = None,
                  normalize: str = DEFAULT_NORMALIZE, calibration: Calibration | None = None,
                  linears: bool | float = False) -> ChannelRanking:
    """Rank every prunable filter; ``normalize="mean"`` divides each layer's scores by their mean,
    ``"macs"`` each score by the multiply-adds its channel costs (``pruning.costs``).

    Raw norms grow with a filter's fan-in (27 weights in VGG's first conv, 4,608 in its last), so
    a global ranking of raw norms empties the early layers first; dividing by the layer mean
    compares filters by how weak they are within their own layer. ``importance="taylor"`` scores
    filters on ``calibration``'s training images (``pruning.taylor``). ``linears``: the hidden
    Linear layers' units are ranked too (``prunable_convs``); a number p: each keeps
    ``(1 - ratio) ** p`` of its own (``ChannelRanking.apart``).
    """
    exponent = linears_exponent(linears)
    if importance not in IMPORTANCES:
        raise ValueError(f"prune.importance must be one of {IMPORTANCES}, got {importance!r}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"prune.normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    example = default_example(model) if example_input is None else example_input
    graph = build_graph(model, example)
    convs = prunable_convs(model, graph=graph, linears=bool(linears))
    if importance == "taylor":
        if calibration is None:
            raise ValueError("prune.importance=taylor scores filters on training images, and none were given: "
                             "pass calibration= (pruning.taylor.Calibration), or use prune.importance=l1")
        scores = calibration.scores(model, convs)  # once per set of weights: see pruning.taylor
    else:
        scores = {name: filter_importance(c, importance) for name, c in convs.items()}
    if normalize == "mean":
        # the smallest positive float as the floor: squared Taylor terms can be far below 1e-12, and
        # an absolute floor would make a whole layer look weak
        scores = {name: s / s.mean().clamp_min(torch.finfo(s.dtype).tiny) for name, s in scores.items()}
    elif normalize == "macs":  # importance per multiply-add saved: cut where the time goes
        costs = channel_costs(model, graph, convs, example.to(next(model.parameters()).device))
        scores = {name: s / costs[name] for name, s in scores.items()}
    apart = {} if exponent is None else {n: exponent for n, c in convs.items() if isinstance(c, nn.Linear)}
    return ChannelRanking(scores, apart)


def linears_exponent(linears: bool | float) -> float | None:
    """The hidden units' own exponent (``linears=p``), or None where they go with the convs
    (``True``) or stay whole (``False``)."""
    if isinstance(linears, bool):
        return None
    if not isinstance(linears, int | float) or not math.isfinite(linears) or linears <= 0:
        raise ValueError(f"prune.linears must be true, false or a number > 0, got {linears!r}")
    return float(linears)


def channel_plan(model: nn.Module, ratio: float, importance: str = "l1", min_channels: int = 1,
                 example_input: torch.Tensor | None = None, normalize: str = DEFAULT_NORMALIZE,
                 round_to: int = DEFAULT_ROUND_TO, scope: str = "global",
                 calibration: Calibration | None = None, linears: bool | float = False) -> dict[str, list[int]]:
    """Which output channels of each prunable conv go at ``ratio`` (sorted indices; model untouched).

    ``example_input`` is only traced to find the prunable convs; by default one 32x32 image.
    ``scope="layerwise"``: every prunable conv loses the same share (``ChannelRanking.plan``).
    """
    return rank_channels(model, importance, example_input, normalize, calibration, linears).plan(
        ratio, min_channels, round_to, layerwise=_layerwise(scope))


def _layerwise(scope: str) -> bool:
    if scope not in ("global", "layerwise"):
        raise ValueError(f"prune.scope must be global or layerwise, got {scope!r}")
    return scope == "layerwise"


def prune_channels(model: nn.Module, plan: Mapping[str, Iterable[int]], example_input: torch.Tensor) -> nn.Module:
    """A pruned deep copy of ``model`` with the planned output channels physically removed."""
    pruned = copy.deepcopy(model)
    graph = build_graph(pruned, example_input)
    head = pruned.get_submodule(last_linear_name(pruned))
    modules = dict(pruned.named_modules())
    for name, idxs in plan.items():
        idxs = sorted({int(i) for i in idxs})
        if not idxs:
            continue
        layer = modules.get(name)
        if not isinstance(layer, Layer):
            raise ValueError(f"plan names {name!r}, which is not a Conv2d or Linear of this model")
        n = width(layer)
        if idxs[0] < 0 or idxs[-1] >= n or len(idxs) >= n:
            raise ValueError(f"plan for {name} removes {len(idxs)} of {n} channels "
                             f"(indices {idxs[0]}..{idxs[-1]}): at least one must stay, all in range")
        why = coupling(graph, layer, head)
        if why:
            raise ValueError(f"cannot prune the output channels of {name} alone: {why}")
        # Each layer's indices are in its own original numbering: earlier groups only shrank
        # other layers' inputs, never this layer's outputs.
        graph.get_pruning_group(layer, out_fn(layer), idxs).prune()
    return pruned


def conv_channels(model: nn.Module) -> dict[str, int]:
    return layer_widths(model)


def layer_widths(model: nn.Module, names: Iterable[str] = ()) -> dict[str, int]:
    """Every conv's output channels, and the units of the Linear layers in ``names``."""
    names = set(names)
    return {name: width(m) for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) or (name in names and isinstance(m, nn.Linear))}


def channel_stats(model: nn.Module, dense: nn.Module, example_input: torch.Tensor | None = None,
                  dense_macs: int | None = None, prunable: Mapping[str, int] | None = None) -> dict:
    """Sizes of a channel-pruned ``model`` against the ``dense`` network it was cut from.

    ``params`` counts all parameters; ``nonzero``/``sparsity``/``layers`` count Conv2d and Linear
    weights against the dense model, as the masking pruners do, so removed weights show as zeros.
    ``channels_removed`` is the share of the prunable layers' channels gone (``prunable``: their
    dense widths, found by tracing ``dense`` when not given: its convs, and its hidden Linear layers
    that ``model`` has fewer units of); with ``round_to > 1`` it differs slightly from the requested
    ratio. ``channels`` lists every conv's width and those of the prunable Linear layers.
    """
    example = example_input if example_input is not None else default_example(dense).to(
        next(dense.parameters()).device)
    if prunable is None:
        # the hidden Linear layers count where they were pruned (prune.linears), not otherwise
        prunable = {n: width(c) for n, c in prunable_convs(dense, example, linears=True).items()
                    if isinstance(c, nn.Conv2d) or width(model.get_submodule(n)) != width(c)}
    dense_weights = {n: w.numel() for n, w in prunable_weights(dense).items()}
    weights = prunable_weights(model)
    layers = {}
    for name, dense_n in dense_weights.items():
        zeros = dense_n - int(torch.count_nonzero(weights[name]))
        layers[name] = {"params": dense_n, "zeros": zeros, "sparsity": zeros / dense_n if dense_n else 0.0}
    dense_total = sum(dense_weights.values())
    nonzero = dense_total - sum(v["zeros"] for v in layers.values())
    channels = layer_widths(model, prunable)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "dense_params": sum(p.numel() for p in dense.parameters()),
        "macs": count_macs(model, example),
        "dense_macs": dense_macs if dense_macs is not None else count_macs(dense, example),
        "nonzero": nonzero,
        "zeros": dense_total - nonzero,
        "sparsity": 1.0 - nonzero / dense_total if dense_total else 0.0,
        "channels": channels,
        "channels_removed": removed_fraction(channels, prunable),
        "layers": layers,
    }


class ChannelPruner:
    """Filter pruning bound to one model: rank once, build a smaller copy per candidate ratio.

    Unlike the masking pruners, ``apply`` returns a NEW model (the original stays untouched and
    is the source of every candidate); callers must use the returned module.
    """

    method = "channel"

    def __init__(self, model: nn.Module, example_input: torch.Tensor, importance: str = "l1", min_channels: int = 1,
                 normalize: str = DEFAULT_NORMALIZE, round_to: int = DEFAULT_ROUND_TO, scope: str = "global",
                 calibration: Calibration | None = None, linears: bool | float = False,
                 linears_kept: Mapping[str, int] | None = None):
        linears_exponent(linears)  # a bad value fails here, not at the first ranking
        if importance not in IMPORTANCES:
            raise ValueError(f"prune.importance must be one of {IMPORTANCES}, got {importance!r}")
        if importance == "taylor" and calibration is None:
            raise ValueError("prune.importance=taylor scores filters on training images, and none were given: "
                             "pass calibration= (pruning.taylor.Calibration), or use prune.importance=l1")
        if min_channels < 1:
            raise ValueError(f"min_channels must be >= 1, got {min_channels}")
        if round_to < 1:
            raise ValueError(f"round_to must be >= 1, got {round_to}")
        self.model = model
        # One image is enough to trace shapes and count MACs, and keeps both cheap.
        self.example_input = example_input.detach()[:1]
        self.importance = importance
        self.calibration = calibration
        self.normalize = normalize
        self.min_channels = min_channels
        self.round_to = round_to
        self.layerwise = _layerwise(scope)
        self.linears = linears
        self.linears_kept = dict(linears_kept or {})  # an iterative step's hidden widths (WidthSteps.options)
        self.ranking: ChannelRanking | None = None
        self.plans: dict[float, dict[str, list[int]]] = {}
        self.current: nn.Module | None = None
        self.ratio: float | None = None
        self._dense_macs: int | None = None
        self._prunable: dict[str, int] = {}

    def prepare(self, ratios: Iterable[float]) -> None:
        if self.ranking is None:
            self.ranking = rank_channels(self.model, self.importance, self.example_input, self.normalize,
                                         self.calibration, self.linears)
            self._prunable = dict(self.ranking.sizes)
        for r in ratios:
            r = round(float(r), 6)
            if r not in self.plans:
                self.plans[r] = self.ranking.plan(r, self.min_channels, self.round_to, self.layerwise,
                                                  self.linears_kept)

    def plan(self, ratio: float) -> dict[str, list[int]]:
        ratio = round(float(ratio), 6)
        self.prepare([ratio])
        return self.plans[ratio]

    def apply(self, ratio: float) -> nn.Module:
        """A new model with ``ratio`` of the prunable channels removed, built from the original."""
        plan = self.plan(ratio)
        self.current = None  # let the previous candidate go before building the next one
        self.current = prune_channels(self.model, plan, self.example_input)
        self.ratio = round(float(ratio), 6)
        return self.current

    def stats(self) -> dict:
        """Sizes of the current candidate (the original before any ``apply``): see ``channel_stats``."""
        model = self.current if self.current is not None else self.model
        if self._dense_macs is None:
            self._dense_macs = count_macs(self.model, self.example_input)
        stats = channel_stats(model, self.model, self.example_input, self._dense_macs, self._prunable or None)
        return dict(stats, ratio=self.ratio or 0.0, round_to=self.round_to)

    def keep_masks(self) -> None:
        """Channel-pruned networks need no masks: removed weights no longer exist."""
        return None

    def finish(self, ratio: float) -> nn.Module:
        """The pruned model at ``ratio``; the ranking and cached plans are dropped."""
        model = self.apply(ratio)
        self.ranking = None
        self.plans = {}
        return model
