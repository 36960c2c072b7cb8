"""The ``prune`` group as one frozen :class:`PruneSpec`, built (and checked) once from the config.

``prune_spec(cfg)`` is the only place the group is read and its values checked: the config check
calls ``check`` (so a bad value stops the run before any work), the prune stage and the recovery
fine-tunes read the spec. The method-independent keys are here; each method's own options (channel's
``importance``, ``normalize``, ``min_channels``, ``round_to``) and their checks are its registry
entry's (``pruning.registry``), their defaults its option file's (``conf/prune/options/``). Keys a
partial config leaves out take those files' defaults.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from importlib.resources import files
from types import MappingProxyType
from typing import Any

from omegaconf import DictConfig, OmegaConf

from prunelab.lr_schedule import LR_SCHEDULES
from prunelab.pruning import registry
from prunelab.pruning.masks import SCOPES
from prunelab.value_specs import (
    FRACTION,
    Spec,
    check_rules,
    choice,
    either,
    group_values,
    integer,
    is_number,
    list_of,
    number,
    optional,
)

SCHEDULES = ("oneshot", "iterative")
GROUP = "prune"
# a whole number of epochs, or a fraction of one below 1 (a CPU's recovery on a share of the data)
RECOVER_EPOCH: Spec = ("a whole number of epochs >= 0 or a fraction of one in (0, 1), like 0.25",
                       lambda v: is_number(v) and v >= 0 and (float(v).is_integer() or v < 1))
# or one per pruning step, the last repeated: a search's first steps cut little and recover fast, the
# last ones cut most, so that is where a CPU's recovery budget buys accuracy
RECOVER_EPOCHS: Spec = either(RECOVER_EPOCH, list_of(RECOVER_EPOCH, "prune.recover_epochs=[1,4]"),
                              words="a whole number of epochs >= 0 or a fraction of one in (0, 1) (like 0.25), "
                                    "or a non-empty list of them, one per pruning step, the last repeating, "
                                    "like prune.recover_epochs=[1,4]")


def rules() -> list[tuple[str, Spec]]:
    """The group's keys and what each must be (built per call: methods registered at run time count)."""
    return [
        ("method", registry.method_spec()),
        ("ratio", optional(FRACTION)),
        ("scope", choice(*SCOPES)),
        ("schedule", choice(*SCHEDULES)),
        ("steps", integer(1)),
        ("recover_epochs", RECOVER_EPOCHS),
        ("recover_lr", number(0, lo_open=True)),
        ("recover_schedule", choice(*LR_SCHEDULES)),
        ("recover_distill", number(0, 1)),
        ("recover_temperature", number(0, lo_open=True)),
        *registry.option_rules(),
    ]


@functools.cache
def yaml_defaults() -> dict[str, Any]:
    """The group's defaults: ``conf/prune/magnitude.yaml`` and every method's option file."""
    import yaml

    conf = files("prunelab").joinpath("conf/prune")
    out = {k: v for k, v in yaml.safe_load(conf.joinpath("magnitude.yaml").read_text()).items() if k != "defaults"}
    for f in sorted(conf.joinpath("options").iterdir(), key=lambda f: f.name):
        if f.name.endswith(".yaml"):
            out.update(yaml.safe_load(f.read_text()) or {})
    return out


@dataclass(frozen=True)
class PruneSpec:
    """How the prune stage prunes: the method, a fixed ratio or a search (None), the schedule."""

    method: str
    ratio: float | None  # None: search for the ratio (the ``search`` group)
    scope: str
    schedule: str
    steps: int
    recover_epochs: tuple[float, ...]  # per step (the last repeats): whole epochs, or a fraction of one (< 1)
    recover_lr: float  # the recovery's peak learning rate
    recover_schedule: str  # cosine: from recover_lr to zero over the recovery; constant
    recover_distill: float = 0.0  # the distillation loss's share of the recovery loss (the dense model teaches)
    recover_temperature: float = 4.0  # the softmax temperature both models' logits are taken at
    options: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))  # every method's own

    @property
    def searches(self) -> bool:
        return self.ratio is None

    @property
    def iterative(self) -> bool:
        return self.schedule == "iterative"

    def recover_epochs_at(self, step: int) -> float:
        """The recovery after pruning step ``step`` (0-based): its own entry, or the list's last."""
        return self.recover_epochs[min(step, len(self.recover_epochs) - 1)]

    def pruner_options(self) -> dict[str, Any]:
        """What ``registry.make_pruner`` takes besides the method and model (each method reads its own)."""
        return {"scope": self.scope, **self.options}


def _epochs(v) -> tuple[float, ...]:
    return tuple(int(e) if float(e).is_integer() else float(e) for e in (v if isinstance(v, list | tuple) else [v]))


def _root(cfg) -> DictConfig:
    return cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)


def check(cfg) -> None:
    """Every ``prune.*`` value the config holds is valid, or one ConfigError naming the key."""
    check_rules(_root(cfg), rules(), GROUP)


def prune_spec(cfg) -> PruneSpec:
    """The ``prune`` group of the composed config ``cfg``, checked, as a frozen spec."""
    values = group_values(_root(cfg), GROUP, rules(), yaml_defaults())
    own = {k for k, _ in registry.option_rules()}
    ratio = values["ratio"]
    return PruneSpec(
        method=str(values["method"]), ratio=None if ratio is None else float(ratio), scope=values["scope"],
        schedule=values["schedule"], steps=int(values["steps"]), recover_epochs=_epochs(values["recover_epochs"]),
        recover_lr=float(values["recover_lr"]), recover_schedule=str(values["recover_schedule"]),
        recover_distill=float(values["recover_distill"]), recover_temperature=float(values["recover_temperature"]),
        options=MappingProxyType({k: v for k, v in values.items() if k in own}))
