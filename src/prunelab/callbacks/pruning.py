"""The pruning callbacks, for your own fits and for the pipeline.

- ``MaskKeeper``: keep pruned weights at zero while a pruned network trains (the pipeline's
  recovery fine-tuning uses it).
- ``PruningCallback``: prune a module with any registered method at fit start or fit end, then
  keep it pruned (``MagnitudePruning``: the same with method magnitude).
- ``RatioSearch``: after a fit, the one-shot search (``prunelab.search.oneshot``) on the fit's
  validation split, leaving the module pruned at the chosen ratio.

None of them reparametrises weights (no ``weight_orig``/``weight_mask``): pruned weights are
plain zeros, so checkpoints, ``state_dict`` and timing always see a permanent, ordinary model.
Biases are never pruned, and nothing resets weights to their initial values.
"""

from __future__ import annotations

import torch
from lightning import Callback, LightningModule, Trainer
from torch import nn

from prunelab.pruning import registry
from prunelab.pruning.masks import SCOPES, prunable_weights
from prunelab.pruning.taylor import with_calibration
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


class PruningCallback(MaskKeeper):
    """Prune the module's network at ``ratio`` with any registered method (``method``; a chain such
    as ``channel+semi_structured`` too) at fit start or fit end, then keep it pruned.

    ``options`` are the method's own (``prune.*``: channel's ``round_to``, ...); ``scope`` is
    ``global`` or ``layerwise``. Pruned at fit start, masked weights stay exactly zero through
    training (see ``MaskKeeper``); a method that builds a new, smaller network (channel) replaces
    the module's ``net`` before Lightning builds the optimiser, so the new network is what trains.
    """

    def __init__(self, ratio: float, method: str = "magnitude", scope: str = "global", when: str = "fit_end",
                 **options):
        super().__init__(None)
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"prune.ratio must be in [0, 1), got {ratio}")
        if not registry.is_known(method):
            raise ValueError(f"prune.method must be one of {registry.methods()} or a chain such as "
                             f"channel+semi_structured, got {method!r}")
        if scope not in SCOPES:
            raise ValueError(f"prune.scope must be one of {SCOPES}, got {scope!r}")
        if when not in ("fit_start", "fit_end"):
            raise ValueError(f"when must be 'fit_start' or 'fit_end', got {when!r}")
        self.ratio, self.method, self.scope, self.when, self.options = ratio, method, scope, when, options

    def prune(self, pl_module: LightningModule, trainer: Trainer | None = None) -> dict:
        net = _net(pl_module)
        # a Taylor ranking measures on the trainer's training images (prune.importance=taylor)
        options = with_calibration(self.options, getattr(trainer, "datamodule", None))
        pruner = registry.make_pruner(self.method, net, self.scope, **options)
        pruned = pruner.finish(self.ratio)
        if pruned is not net:  # a new, smaller network: the module must hold it from now on
            if not hasattr(pl_module, "net"):
                raise ValueError(f"prune.method={self.method} builds a new network: the LightningModule needs a "
                                 "`net` attribute to hold it")
            pl_module.net = pruned
        self.masks = pruner.keep_masks()
        stats = pruner.stats()
        if trainer is not None:
            log_sparsity(trainer.loggers, stats, trainer.global_step)
        return stats

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Lightning builds the optimiser between setup and on_fit_start: a method that builds a new
        # network prunes here, or the optimiser would hold (and train) the old parameters.
        if stage == "fit" and self.when == "fit_start" and not registry.in_place(self.method):
            self.prune(pl_module, trainer)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.when == "fit_start" and registry.in_place(self.method):
            self.prune(pl_module, trainer)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.when == "fit_end":
            self.prune(pl_module, trainer)


class MagnitudePruning(PruningCallback):
    """``PruningCallback`` with ``method="magnitude"``: prune by magnitude at ``ratio`` (global or
    layerwise) at fit start or fit end."""

    def __init__(self, ratio: float, scope: str = "global", when: str = "fit_end"):
        super().__init__(ratio, "magnitude", scope, when)


class RatioSearch(OneShotSearch, Callback):
    """After fit, search the highest ratio within ``tolerance`` of the dense validation accuracy
    (arguments as ``OneShotSearch``); the module's network is left pruned at the answer."""

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.memory_format = getattr(pl_module, "memory_format", self.memory_format)
        self.pruner_options = with_calibration(self.pruner_options, trainer.datamodule)
        self.run(_net(pl_module), trainer.datamodule.val_set, pl_module.device, trainer)
        if hasattr(pl_module, "net"):
            pl_module.net = self.model

    def run(self, model: nn.Module, val_set, device: torch.device, trainer: Trainer | None = None,
            dense: Evaluation | None = None, identity: dict | None = None) -> SearchResult:
        return super().run(model, val_set, device, dense, identity,
                           loggers=trainer.loggers if trainer is not None else (),
                           rank_zero=trainer is None or trainer.is_global_zero)
