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

log = logging.getLogger("prunelab")


def _onednn() -> bool:
    from prunelab.models.packed import available  # imported late: the models package pulls in Lightning

    return available()


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
    """Replace ``auto`` in trainer.precision, model.channels_last, model.compile, latency.dtype,
    latency.channels_last, latency.fuse, latency.winograd and latency.pack with what this machine runs fastest; explicit values stay and are warned about when slow.
    Returns ``{"hardware": ..., key: {"requested", "value", "reason"}}`` for the report."""
    hw = hardware.detect(run_device(cfg))
    record: dict = {"hardware": hw.to_dict()}
    rules = [("trainer.precision", cfg.trainer, "precision", hardware.resolve_precision),
             ("model.channels_last", cfg.model, "channels_last", hardware.resolve_channels_last),
             ("model.compile", cfg.model, "compile", hardware.resolve_compile)]
    if "latency" in cfg:
        rules += [("latency.dtype", cfg.latency, "dtype", hardware.resolve_dtype),
                  ("latency.channels_last", cfg.latency, "channels_last", hardware.resolve_deploy_layout),
                  ("latency.fuse", cfg.latency, "fuse",
                   lambda r, hw: hardware.resolve_fuse(r, hw, compile=bool(cfg.latency.get("compile", False)),
                                                       runtime=str(cfg.latency.get("runtime", "deploy")))),
                  # after latency.dtype: its resolved value decides (float32 only)
                  ("latency.winograd", cfg.latency, "winograd",
                   lambda r, hw: hardware.resolve_winograd(r, hw, str(cfg.latency.get("dtype", "auto")),
                                                           runtime=str(cfg.latency.get("runtime", "deploy")),
                                                           compile=bool(cfg.latency.get("compile", False)))),
                  ("latency.pack", cfg.latency, "pack",
                   lambda r, hw: hardware.resolve_pack(r, hw, str(cfg.latency.get("dtype", "auto")),
                                                       runtime=str(cfg.latency.get("runtime", "deploy")),
                                                       compile=bool(cfg.latency.get("compile", False)),
                                                       onednn=_onednn()))]
    for key, node, name, rule in rules:
        if name not in node:
            continue
        requested = node[name]
        res = rule(requested, hw)
        value = str(res.value).removeprefix("torch.") if isinstance(res.value, torch.dtype) else res.value
        with open_dict(node):
            node[name] = value
        record[key] = {"requested": requested, "value": value, "reason": res.reason}
        if res.ran is not None:
            record[key]["ran"] = res.ran
        if res.warning:
            warnings.warn(res.warning, stacklevel=2)
            log.warning("%s", res.warning)
            record[key]["warning"] = res.warning
        if str(requested).lower() == "auto":
            log.info("%s=auto -> %s (%s)", key, value, res.reason)
    return record
