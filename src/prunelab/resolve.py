"""Resolve every ``auto`` in a composed config from the machine the run is on, in place.

The rules live in ``prunelab.hardware`` (pure); this applies them to the config keys before
anything is built, so the fine-tune cache key, the trainer and the report all see concrete
values, and records what each resolved to and why for the report and the log.
"""

from __future__ import annotations

import logging
import warnings

import torch
from omegaconf import DictConfig, open_dict

from prunelab import hardware
from prunelab.errors import ConfigError
from prunelab.models.rewrite import data_image_size, fold_training_problem

log = logging.getLogger("prunelab")


CUDA_ACCELERATORS = ("gpu", "cuda")


def run_device(cfg: DictConfig) -> str:
    """The device type the run's trainer will use: "cuda" or "cpu"."""
    accelerator = str(cfg.trainer.get("accelerator", "auto")).lower()
    if accelerator in CUDA_ACCELERATORS:
        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.accelerator={accelerator} but this machine has no usable CUDA GPU; "
                              "use trainer.accelerator=cpu (or auto)")
        return "cuda"
    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


def resolve_auto(cfg: DictConfig) -> dict:
    """Replace ``auto`` in trainer.precision, model.channels_last, model.compile and the latency
    group's hardware-dependent keys (dtype, channels_last, fuse) with what this
    machine runs fastest; explicit values stay and are warned about when slow.
    Returns ``{"hardware": ..., key: {"requested", "value", "reason"}}`` for the report."""
    return resolve_run(cfg)[0]


def resolve_run(cfg: DictConfig):
    """``resolve_auto``'s record, and the run's one resolved ``DeploySpec`` (None without a
    ``latency`` group): the latency keys are resolved once, by ``prunelab.deploy.spec``, and the
    concrete values written back into the config so the saved config shows them."""
    hw = hardware.detect(run_device(cfg))
    record: dict = {"hardware": hw.to_dict()}
    rules = [("trainer.precision", cfg.trainer, "precision", hardware.resolve_precision),
             ("model.channels_last", cfg.model, "channels_last", hardware.resolve_channels_last),
             ("model.compile", cfg.model, "compile", hardware.resolve_compile)]
    for key, node, name, rule in rules:
        if name not in node:
            continue
        requested = node[name]
        res = rule(requested, hw)
        _apply(record, key, node, name, requested, res.value, res.reason, res.warning, res.ran)
    if "fold_classifier" in cfg.get("model", {}):
        _resolve_fold(record, cfg)
    spec = None
    if "latency" in cfg:
        from prunelab.deploy.spec import resolve_spec

        precision = record.get("trainer.precision", {})  # what trains and evaluates (the eager runtime's autocast)
        precision = precision.get("ran", precision.get("value", str(cfg.trainer.get("precision", "32-true"))))
        spec, resolved = resolve_spec(cfg.latency, hw, precision=str(precision))
        for name, r in resolved.items():
            if name in cfg.latency:
                _apply(record, f"latency.{name}", cfg.latency, name, r["requested"], r["value"], r["reason"],
                       r.get("warning"))
    return record, spec


def _resolve_fold(record: dict, cfg: DictConfig) -> None:
    """``model.fold_classifier``: auto folds where the fold is exact (not a question of hardware)."""
    requested = cfg.model.fold_classifier
    problem = fold_training_problem(cfg.model.get("arch", ""), data_image_size(cfg))
    if str(requested).lower() == "auto":
        value = problem is None
        reason = "auto: " + ("VGG at 32x32, the fold is exact" if value else problem)
    else:
        value, reason = bool(requested), f"explicit model.fold_classifier={bool(requested)} honoured"
    _apply(record, "model.fold_classifier", cfg.model, "fold_classifier", requested, value, reason, None)


def _apply(record: dict, key: str, node, name: str, requested, value, reason: str, warning: str | None,
           ran=None) -> None:
    value = str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value
    with open_dict(node):
        node[name] = value
    record[key] = {"requested": requested, "value": value, "reason": reason}
    if ran is not None:
        record[key]["ran"] = ran
    if warning:
        warnings.warn(warning, stacklevel=3)
        log.warning("%s", warning)
        record[key]["warning"] = warning
    if str(requested).lower() == "auto":
        log.info("%s=auto -> %s (%s)", key, value, reason)
