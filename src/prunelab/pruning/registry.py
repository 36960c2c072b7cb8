"""One entry per pruning method: how its pruner is built and what the rest of prunelab needs to know
about the models it makes, so the pipeline, the searches, the deploy runtimes and the callbacks
read the entry instead of testing method names.

An entry (:class:`Method`) says:

- ``build(model, scope=..., **options)``: the pruner. Every pruner has ``prepare(ratios)`` (rank
  once), ``apply(ratio) -> nn.Module`` (the candidate), ``stats()``, ``keep_masks()`` (what must
  stay zero while the candidate trains, or None) and ``finish(ratio) -> nn.Module``;
- ``options``: the ``prune.*`` keys it reads beyond the scope, each with its check (their defaults
  are the config's, in ``conf/prune/options/<name>.yaml``);
- ``kernels``: which kernels its models run on (``KERNELS``), hence whether it can be faster than
  the dense model on a device and whether the deploy runtimes build 2:4 forms of it;
- ``in_place``: it masks the model it is given (True) or builds a new, smaller one;
- ``stats(pruned, dense)``: a pruned model's statistics against the dense one (default: the zeros
  of its own weights); ``report_keys``: which of them the report lists per candidate;
- ``save``/``load``: its compact file form in a run's ``models/`` (default: a state_dict);
- ``steps``: makes the rule by which the iterative schedule asks it for a total ratio (default:
  the target itself);
- ``shapes_fix_network``: two candidates of equal layer shapes are one network.

A chain such as ``channel+semi_structured`` (``pruning.chain``) is read from its links: built and
saved as its first, on 2:4 kernels where any link is 2:4. A new method is one module plus one entry
in ``METHODS`` (or :func:`register` from your own code).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunelab.value_specs import BOOL, Spec, choice, either, integer, number

# What a method's models run on: the dense kernels (zeros in dense tensors: never faster than the
# dense model), a smaller dense network (faster wherever it runs), 2:4 sparse kernels (CUDA only;
# masked-dense elsewhere), or not declared (a registered method: timed and judged like a
# structured one, to be safe).
KERNELS = ("dense", "smaller", "two_four", "unknown")


@dataclass(frozen=True)
class Method:
    build: Callable[..., object]
    kernels: str = "unknown"
    in_place: bool = True
    options: Mapping[str, Spec] = field(default_factory=dict)
    report_keys: tuple[str, ...] = ()
    stats: Callable[[nn.Module, nn.Module], dict] | None = None
    save: Callable[[nn.Module, Path, str, int], dict] | None = None
    load: Callable[[Path], nn.Module | None] | None = None
    steps: Callable[..., object] | None = None  # makes the iterative step rule from prune.* (see ``steps()``)
    shapes_fix_network: bool = False

    def __post_init__(self):
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {self.kernels!r}")

    def speeds_up(self, device_type: str) -> bool:
        """Whether its models can run faster than the dense one on this device type."""
        if self.kernels == "dense":
            return False
        return device_type == "cuda" if self.kernels == "two_four" else True


def _magnitude(model: nn.Module, scope: str = "global", **_):
    from prunelab.pruning.magnitude import MagnitudePruner

    return MagnitudePruner(model, scope)


# channel's option values (the ranking's score: a weight norm, or first-order Taylor on training
# images; its per-layer normalisation); ``pruning.channel`` reads them from here, so the config check
# needs no Torch-Pruning import.
IMPORTANCES = ("l1", "l2", "taylor")
NORMALIZATIONS = ("mean", "none", "macs")


# prune.linears: the hidden units go with the convs (true), stay (false), or keep (1 - ratio) ** p
LINEARS = either(BOOL, number(0, lo_open=True), words="true, false or a number > 0")


def _channel(model: nn.Module, importance: str = "l1", normalize: str = "mean", min_channels: int = 1,
             round_to: int = 16, example_input: torch.Tensor | None = None, scope: str = "global",
             calibration=None, linears: bool | float = False, linears_kept=None, **_):
    from prunelab.pruning.channel import ChannelPruner, default_example

    example = example_input if example_input is not None else default_example(model)
    device = next(model.parameters()).device
    return ChannelPruner(model, example.to(device), importance=importance, min_channels=min_channels,
                         normalize=normalize, round_to=round_to, scope=scope, calibration=calibration,
                         linears=linears, linears_kept=linears_kept)


def _channel_stats(pruned: nn.Module, dense: nn.Module) -> dict:
    from prunelab.pruning.channel import channel_stats

    return channel_stats(pruned, dense)


def _channel_save(net: nn.Module, models_dir: Path, arch: str, num_classes: int) -> dict:
    from prunelab.pruning.channel_files import save_compact

    return save_compact(net, models_dir, arch, num_classes)


def _channel_load(models_dir: Path) -> nn.Module | None:
    from prunelab.pruning.channel_files import load_compact

    return load_compact(models_dir)


def _channel_steps(linears: bool | float = False, **_):
    from prunelab.pruning.width_steps import WidthSteps

    return WidthSteps(linears)


def _semi_structured(model: nn.Module, **_):
    from prunelab.pruning.semi_structured import SemiStructuredPruner

    return SemiStructuredPruner(model)


# method name -> entry. Every constructor takes the options it needs and ignores the rest, so every
# method is built from the same ``prune.*`` settings.
METHODS: dict[str, Method] = {
    "magnitude": Method(_magnitude, kernels="dense"),
    "channel": Method(_channel, kernels="smaller", in_place=False,
                      options={"importance": choice(*IMPORTANCES), "normalize": choice(*NORMALIZATIONS),
                               "min_channels": integer(1), "round_to": integer(1),
                               "calibration_batches": integer(1), "linears": LINEARS},
                      report_keys=("params", "macs", "channels", "channels_removed"), stats=_channel_stats,
                      save=_channel_save, load=_channel_load, steps=_channel_steps, shapes_fix_network=True),
    "semi_structured": Method(_semi_structured, kernels="two_four", report_keys=("two_four_layers",)),
}


def methods() -> tuple[str, ...]:
    """The method names ``prune.method`` accepts, registered ones included."""
    return tuple(METHODS)


def register(method: str, constructor: Callable[..., object], **entry: Any) -> None:
    """Add a pruning method: ``constructor(model, **prune_options)`` returns a pruner (see above);
    ``entry`` sets the :class:`Method` fields it knows (kernels, in_place, options, ...)."""
    METHODS[method] = Method(constructor, **entry)


def is_known(method: str) -> bool:
    """A registered method, or a chain such as ``channel+semi_structured`` (see ``pruning.chain``)."""
    from prunelab.pruning.chain import FULL_EXTENT, parts

    names = parts(method)
    return all(n in METHODS for n in names) and all(n in FULL_EXTENT for n in names[1:])


def method_spec() -> Spec:
    """What ``prune.method`` and each of ``search.methods`` must be (methods registered so far)."""
    return (f"a pruning method ({', '.join(methods())}) or a chain like channel+semi_structured",
            lambda v: isinstance(v, str) and is_known(v))


def option_rules() -> list[tuple[str, Spec]]:
    """Every method's own ``prune.*`` options and their checks, in registration order."""
    rules: dict[str, Spec] = {}
    for m in METHODS.values():
        rules.update(m.options)
    return list(rules.items())


def links(method: str | None) -> list[Method]:
    """The entries of ``method``'s links (one for a plain method; none for None or an unknown one)."""
    if not method:
        return []
    from prunelab.pruning.chain import parts

    return [METHODS[n] for n in parts(method) if n in METHODS]


def make_pruner(method: str, model: nn.Module, scope: str = "global", **options):
    if not is_known(method):
        raise ValueError(f"prune.method must be one of {tuple(METHODS)} or a chain such as "
                         f"channel+semi_structured, got {method!r}")
    from prunelab.pruning.chain import ChainPruner, parts

    first, *later = parts(method)
    pruner = METHODS[first].build(model, scope=scope, **options)
    if not later:
        return pruner
    return ChainPruner(model, pruner,
                       [(m, lambda net, m=m: METHODS[m].build(net, scope=scope, **options)) for m in later])


def candidate_extra(method: str, stats: dict) -> dict:
    """Per-candidate figures the report shows beside accuracy (params and MACs where they change)."""
    keys = [k for m in links(method) for k in m.report_keys]
    return {k: stats[k] for k in keys if k in stats}


def speeds_up(method: str, device_type: str) -> bool:
    """Whether ``method``'s models can run faster than the dense model on this device type: a chain
    when any link can; an unknown method, to be safe."""
    found = links(method)
    return any(m.speeds_up(device_type) for m in found) if found else True


def two_four(method: str | None) -> bool:
    """Its models carry 2:4 layers: the runtimes build their sparse (or masked-dense) forms."""
    return any(m.kernels == "two_four" for m in links(method))


def dense_kernels(method: str | None) -> bool:
    """Its models run exactly the dense kernels on the dense shapes (unstructured zeros): any
    timing difference from the dense model is noise, never a speedup."""
    found = links(method)
    return bool(found) and all(m.kernels == "dense" for m in found)


def in_place(method: str) -> bool:
    """Its pruner masks the model it is given (so callers that keep the model hand it a copy)."""
    found = links(method)
    return found[0].in_place if found else True


def stats(method: str, pruned: nn.Module, dense: nn.Module) -> dict:
    """A pruned model's statistics against the dense network it came from (its first link's rule)."""
    found = links(method)
    if found and found[0].stats is not None:
        return found[0].stats(pruned, dense)
    from prunelab.pruning.masks import prunable_weights, sparsity

    return sparsity(prunable_weights(pruned))


def counted_weights(method: str, pruned: nn.Module, outcome_stats: dict) -> dict:
    """The weight counts the report gives a pruned model: a copying method's own statistics (counted
    against the dense network it was cut from); a masking method's zeros, read off its weights."""
    if not in_place(method):
        return outcome_stats
    from prunelab.pruning.masks import prunable_weights, sparsity

    return sparsity(prunable_weights(pruned))


def save_pruned(method: str, net: nn.Module, models_dir: Path, arch: str, num_classes: int) -> dict | None:
    """Write ``net`` in its method's compact form (its first link's); None: the method has none
    (the caller writes a state_dict)."""
    found = links(method)
    save = found[0].save if found else None
    return save(net, Path(models_dir), arch, num_classes) if save is not None else None


def load_pruned(models_dir: Path) -> nn.Module | None:
    """A pruned model that a method wrote in its compact form in ``models_dir``, else None."""
    for m in METHODS.values():
        if m.load is not None:
            net = m.load(Path(models_dir))
            if net is not None:
                return net
    return None


def steps(method: str, options: Mapping | None = None):
    """How the iterative schedule asks ``method`` for a total ratio: an object with ``start(net)``,
    ``ratio(net, target, start)``, ``options(net, target, start)`` (more pruner options for the
    step) and ``stats(pruned, stats, start)``, built from the ``prune.*``
    ``options``; None: ask the target itself (a masking pruner ranks the current weights, zeros
    first). Chains: None."""
    m = METHODS.get(method)
    return m.steps(**(options or {})) if m is not None and m.steps is not None else None


def architecture_key(method: str, candidate: nn.Module) -> str | None:
    """One key per network, where equal keys mean the same network: a channel-pruned model is a
    smaller dense network whose layer shapes fix which filters remain (each layer keeps its own
    highest ranked), so two ratios rounded to the same widths are one model. None for methods whose
    zeros or 2:4 layers differ between ratios of equal shapes (and for chains)."""
    m = METHODS.get(method)
    if m is None or not m.shapes_fix_network:
        return None
    shapes = [(k, tuple(v.shape)) for k, v in candidate.state_dict().items()]
    return f"{method}:" + hashlib.sha256(repr(shapes).encode()).hexdigest()[:16]


