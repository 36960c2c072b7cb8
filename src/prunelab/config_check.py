"""Eager validation of the composed config: bad values stop the run before any work, with one
message that names the key to change."""

from __future__ import annotations

from omegaconf import DictConfig

from prunelab.errors import ConfigError
from prunelab.pruning.masks import SCOPES
from prunelab.pruning.registry import methods
from prunelab.search.rules import RULES

SCHEDULES = ("oneshot", "iterative")


def _ratio(key: str, value) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0.0 <= float(value) < 1.0:
        raise ConfigError(f"{key}={value} is out of range: a pruning ratio must be in [0, 1)")


def check(cfg: DictConfig) -> None:
    p, s = cfg.prune, cfg.search
    if p.method not in methods():
        raise ConfigError(f"prune.method={p.method} is unknown; use one of {', '.join(methods())}")
    if p.get("scope", "global") not in SCOPES:
        raise ConfigError(f"prune.scope={p.scope} is unknown; use one of {', '.join(SCOPES)}")
    if p.get("schedule", "oneshot") not in SCHEDULES:
        raise ConfigError(f"prune.schedule={p.schedule} is unknown; use one of {', '.join(SCHEDULES)}")
    if p.ratio is not None:
        _ratio("prune.ratio", p.ratio)
    if int(p.get("steps", 1)) < 1:
        raise ConfigError(f"prune.steps={p.steps} must be >= 1")
    if int(p.get("recover_epochs", 0)) < 0:
        raise ConfigError(f"prune.recover_epochs={p.recover_epochs} must be >= 0")
    if p.get("importance", "l1") not in ("l1", "l2"):
        raise ConfigError(f"prune.importance={p.importance} is unknown; use l1 or l2")
    if p.get("normalize", "mean") not in ("mean", "none"):
        raise ConfigError(f"prune.normalize={p.normalize} is unknown; use mean or none")
    if int(p.get("min_channels", 1)) < 1:
        raise ConfigError(f"prune.min_channels={p.min_channels} must be >= 1")
    if not isinstance(p.get("round_to", 1), int) or isinstance(p.get("round_to", 1), bool) or p.get("round_to", 1) < 1:
        raise ConfigError(f"prune.round_to={p.round_to} must be an integer >= 1 (1: no rounding)")
    devices = cfg.trainer.get("devices", 1)
    if p.get("schedule") == "iterative" and (cfg.trainer.get("strategy") == "ddp" or (isinstance(devices, int) and devices > 1)):
        raise ConfigError("prune.schedule=iterative runs in one process; use trainer.devices=1 (no DDP) for it")
    if s.rule not in RULES:
        raise ConfigError(f"search.rule={s.rule} is unknown; use one of {', '.join(RULES)}")
    if not isinstance(s.tolerance, int | float) or s.tolerance < 0:
        raise ConfigError(f"search.tolerance={s.tolerance} must be a number >= 0 (percentage points)")
    if not s.grid:
        raise ConfigError("search.grid is empty; give at least one ratio, e.g. search.grid=[0.2,0.5,0.8]")
    for r in s.grid:
        _ratio("search.grid", r)
    if not isinstance(s.get("full_curve", False), bool):
        raise ConfigError(f"search.full_curve={s.full_curve} must be true or false")
    if not isinstance(s.get("fast_eval", True), bool):
        raise ConfigError(f"search.fast_eval={s.fast_eval} must be true or false")
    if s.refine_step is not None and not 0.0 < float(s.refine_step) < 1.0:
        raise ConfigError(f"search.refine_step={s.refine_step} must be in (0, 1), or null for no refinement")
    lat = cfg.latency
    if lat.iters < 1 or lat.warmup < 0 or lat.batch_size < 1:
        raise ConfigError("latency.iters and latency.batch_size must be >= 1 and latency.warmup >= 0")
