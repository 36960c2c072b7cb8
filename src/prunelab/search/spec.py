"""The ``search`` group as one frozen :class:`SearchSpec`, built (and checked) once from the config.

``search_spec(cfg)`` is the only place the group is read and its values checked (the config check
calls ``check``); the prune stage and the searches read the spec. Keys a partial config leaves out
take ``conf/search/default.yaml``'s values.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from omegaconf import DictConfig, OmegaConf

from prunelab.errors import ConfigError
from prunelab.pruning.registry import method_spec
from prunelab.search.pareto import OBJECTIVES
from prunelab.search.rules import RULES
from prunelab.value_specs import (
    BOOL,
    FRACTION,
    Spec,
    check_rules,
    choice,
    group_values,
    integer,
    list_of,
    number,
    optional,
    plain,
)

GROUP = "search"


def rules() -> list[tuple[str, Spec]]:
    """The group's keys and what each must be (built per call: methods registered at run time count)."""
    return [
        *((k, BOOL) for k in ("exact", "full_curve", "fast_eval", "walk_all", "allow_weak_model")),
        ("grid", list_of(FRACTION, "search.grid=[0.2,0.5]")),
        ("refine_step", optional(number(0, 1, lo_open=True))),
        ("tolerance", number(0)),
        ("rule", choice(*RULES)),
        ("objective", choice(*OBJECTIVES)),
        ("methods", list_of(method_spec(), "search.methods=[magnitude,channel+semi_structured]")),
        ("confidence", optional(number(0, 1, lo_open=True))),
        ("final_round", integer(0)),
    ]


@functools.cache
def yaml_defaults() -> dict[str, Any]:
    import yaml

    return yaml.safe_load(files("prunelab").joinpath("conf/search/default.yaml").read_text())


@dataclass(frozen=True)
class SearchSpec:
    """How a ratio is searched, and what "best" means among the candidates within the tolerance."""

    grid: tuple[float, ...]
    refine_step: float | None
    tolerance: float
    rule: str
    exact: bool
    full_curve: bool
    fast_eval: bool
    objective: str  # sparsity: one method's highest ratio; any other: the best model across ``methods``
    methods: tuple[str, ...]
    confidence: float | None
    final_round: int
    walk_all: bool
    allow_weak_model: bool

    @property
    def across_methods(self) -> bool:
        """Every objective but sparsity searches across ``methods``."""
        return self.objective != "sparsity"


def _root(cfg) -> DictConfig:
    return cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)


def check(cfg) -> None:
    """Every ``search.*`` value the config holds is valid, or one ConfigError naming the key."""
    cfg = _root(cfg)
    check_rules(cfg, rules(), GROUP)
    listed = plain(cfg, f"{GROUP}.methods")
    listed = [str(m) for m in listed] if isinstance(listed, list) else []
    repeated = sorted({m for m in listed if listed.count(m) > 1})
    if repeated:  # each would be walked and listed twice, and its verdicts counted twice
        raise ConfigError(f"search.methods lists {', '.join(repeated)} more than once; list each method once, e.g. "
                          f"search.methods=[{','.join(dict.fromkeys(listed))}]")


def search_spec(cfg) -> SearchSpec:
    """The ``search`` group of the composed config ``cfg``, checked, as a frozen spec."""
    cfg = _root(cfg)
    check(cfg)
    v = group_values(cfg, GROUP, rules(), yaml_defaults())
    refine, confidence = v["refine_step"], v["confidence"]
    return SearchSpec(
        grid=tuple(float(r) for r in v["grid"]), refine_step=None if refine is None else float(refine),
        tolerance=float(v["tolerance"]), rule=v["rule"], exact=v["exact"], full_curve=v["full_curve"],
        fast_eval=v["fast_eval"], objective=v["objective"], methods=tuple(str(m) for m in v["methods"]),
        confidence=None if confidence is None else float(confidence), final_round=int(v["final_round"]),
        walk_all=v["walk_all"], allow_weak_model=v["allow_weak_model"])
