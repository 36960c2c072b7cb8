"""``LatencyCallback``: after ``trainer.test``, the module served and timed as a run times it
(``prunelab.deploy.session``: the same spec, runtime and agreement check), p50/p90/p99 logged."""

from __future__ import annotations

import torch
from lightning import Callback, LightningModule, Trainer

from prunelab.deploy.spec import DeploySpec


def _net(pl_module: LightningModule):
    return getattr(pl_module, "net", pl_module)


class LatencyCallback(Callback):
    """After ``trainer.test``, the module's network served and timed as a run times it: ``latency``
    (the ``latency`` group's keys, e.g. ``runtime="deploy", batch_size=32``; keys left out take
    ``conf/latency/default.yaml``'s values) resolved into a ``DeploySpec`` for the module's device
    (or ``spec``, one already resolved), ``auto`` decided as the run decides it, the served form's
    answers checked against the eager fp32 model (on the first validation images where the data
    module has a validation split, else on the timing batches), then timed in that runtime at every
    batch size. Logs ``latency/<tag>/{p50,p90,p99}_ms`` at the headline batch size; ``results[tag]``
    holds those figures, ``timings[tag]`` the whole timing (runtime, dtype, every batch size)."""

    def __init__(self, tag: str = "model", spec: DeploySpec | None = None, **latency):
        from omegaconf import OmegaConf

        from prunelab.deploy.spec import check, check_retired, yaml_defaults

        check_retired({"latency": latency})  # a retired key gets its own advice, not "unknown"
        unknown = sorted(set(latency) - set(yaml_defaults()))
        if unknown:
            raise ValueError(f"LatencyCallback: {', '.join(unknown)} not a latency setting; "
                             f"use any of {', '.join(yaml_defaults())}")
        check(OmegaConf.create({"latency": latency}))
        self.tag, self.spec, self.latency = tag, spec, latency
        self.results: dict[str, dict] = {}
        self.timings: dict[str, dict] = {}

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from prunelab.deploy.session import open_session
        from prunelab.deploy.spec import resolve_spec
        from prunelab.hardware import detect

        net, device, precision = _net(pl_module), pl_module.device, str(trainer.precision)
        spec = self.spec or resolve_spec(self.latency, detect(device), precision)[0]
        dm = trainer.datamodule
        layout = getattr(pl_module, "memory_format", torch.contiguous_format) == torch.channels_last
        session = open_session(spec, net, dm.test_set, getattr(dm, "val_set", None), device, precision, layout)
        timing = session.time(net, None, None)
        stats = self.results[self.tag] = timing["dense"]
        self.timings[self.tag] = timing
        for lg in trainer.loggers:
            lg.log_metrics({f"latency/{self.tag}/{k}_ms": stats[k] for k in ("p50", "p90", "p99")}, step=0)
