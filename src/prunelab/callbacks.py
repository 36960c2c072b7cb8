"""Lightning callbacks, each with one job, for your own fits and for the pipeline.

- ``MaskKeeper``: keep pruned weights at zero while a pruned network trains (the pipeline's
  recovery fine-tuning uses it).
- ``MagnitudePruning``: prune a module by magnitude at fit start or fit end, then keep it pruned.
- ``RatioSearch``: after a fit, the one-shot search (``prunelab.search.oneshot``) on the fit's
  validation split, leaving the module pruned at the chosen ratio.
- ``LatencyCallback``: after testing, time the module's forward pass and log p50/p90/p99.

None of them reparametrises weights (no ``weight_orig``/``weight_mask``): pruned weights are
plain zeros, so checkpoints, ``state_dict`` and timing always see a permanent, ordinary model.
Biases are never pruned, and nothing resets weights to their initial values.
"""

from __future__ import annotations

import torch
from lightning import Callback, LightningModule, Trainer
from torch import nn

from prunelab.latency import LatencyMonitor, sample_batch
from prunelab.pruning.magnitude import MagnitudePruner
from prunelab.pruning.masks import SCOPES, prunable_weights
from prunelab.search.oneshot import OneShotSearch, log_sparsity
from prunelab.search.rules import Evaluation, SearchResult


def _net(pl_module: LightningModule) -> nn.Module:
    return getattr(pl_module, "net", pl_module)


class MaskKeeper(Callback):
    """Keep pruned weights exactly zero while a pruned network trains.

    Re-applies the keep-masks after every optimiser step, so neither momentum nor weight decay
    can revive a pruned weight. ``masks`` maps module names (as in ``prunable_weights``) to
    boolean keep-masks.
    """

    def __init__(self, masks: dict[str, torch.Tensor] | None = None):
        self.masks = masks

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.masks:
            return
        weights = prunable_weights(_net(pl_module))
        for name, keep in self.masks.items():
            w = weights[name]
            w.mul_(keep.to(w.device))


class MagnitudePruning(MaskKeeper):
    """Prune by magnitude at ``ratio`` (global or layerwise) at fit start or fit end.

    Pruned at fit start, the weights stay exactly zero through training (see ``MaskKeeper``).
    """

    def __init__(self, ratio: float, scope: str = "global", when: str = "fit_end"):
        super().__init__(None)
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"prune.ratio must be in [0, 1), got {ratio}")
        if scope not in SCOPES:
            raise ValueError(f"prune.scope must be one of {SCOPES}, got {scope!r}")
        if when not in ("fit_start", "fit_end"):
            raise ValueError(f"when must be 'fit_start' or 'fit_end', got {when!r}")
        self.ratio, self.scope, self.when = ratio, scope, when

    def prune(self, pl_module: LightningModule, trainer: Trainer | None = None) -> dict:
        pruner = MagnitudePruner(_net(pl_module), self.scope)
        pruner.finish(self.ratio)
        self.masks = pruner.keep_masks()
        stats = pruner.stats()
        if trainer is not None:
            log_sparsity(trainer.loggers, stats, trainer.global_step)
        return stats

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.when == "fit_start":
            self.prune(pl_module, trainer)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.when == "fit_end":
            self.prune(pl_module, trainer)


class RatioSearch(OneShotSearch, Callback):
    """After fit, search the highest ratio within ``tolerance`` of the dense validation accuracy
    (arguments as ``OneShotSearch``); the module's network is left pruned at the answer."""

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.memory_format = getattr(pl_module, "memory_format", self.memory_format)
        self.run(_net(pl_module), trainer.datamodule.val_set, pl_module.device, trainer)
        if hasattr(pl_module, "net"):
            pl_module.net = self.model

    def run(self, model: nn.Module, val_set, device: torch.device, trainer: Trainer | None = None,
            dense: Evaluation | None = None, identity: dict | None = None) -> SearchResult:
        return super().run(model, val_set, device, dense, identity,
                           loggers=trainer.loggers if trainer is not None else (),
                           rank_zero=trainer is None or trainer.is_global_zero)


class LatencyCallback(LatencyMonitor, Callback):
    """After ``trainer.test``, time the module's forward pass on the first test images and log
    ``latency/<tag>/p50_ms`` (and p90, p99) through the trainer's loggers."""

    def __init__(self, tag: str = "model", **kwargs):
        LatencyMonitor.__init__(self, **kwargs)
        self.tag = tag

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        batch = sample_batch(trainer.datamodule.test_set, self.batch_size)
        batch = batch.contiguous(memory_format=getattr(pl_module, "memory_format", torch.contiguous_format))
        self.measure(pl_module, batch, pl_module.device, self.tag, trainer.loggers)
