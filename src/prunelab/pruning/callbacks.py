"""Lightning glue for pruning: small callbacks, each with one job.

- ``MagnitudePruning``: prune a module at fit start or fit end, keep pruned weights at zero
  during training, log sparsity.
- ``RatioSearch``: after fit, find the highest ratio within a tolerance of the dense validation
  accuracy, and leave the module pruned at it. With ``full_curve=False`` (the config's default)
  and the contiguous rule it stops each phase at its first failing ratio (same answer).

None of them reparametrises weights (no ``weight_orig``/``weight_mask``): pruned weights are
plain zeros, so checkpoints, ``state_dict`` and timing always see a permanent, ordinary model.
Biases are never pruned, and nothing resets weights to their initial values.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
from lightning import Callback, LightningModule, Trainer
from torch import nn
from torch.utils.data import Dataset

from prunelab.evaluation import count_correct, shard_loader
from prunelab.pruning.journal import Journal
from prunelab.pruning.magnitude import MagnitudePruner, search_ratios
from prunelab.pruning.masks import SCOPES, prunable_weights
from prunelab.pruning.registry import METHODS, candidate_extra, make_pruner
from prunelab.pruning.search import RULES, Evaluation, SearchResult, search

log = logging.getLogger(__name__)


def _net(pl_module: LightningModule) -> nn.Module:
    return getattr(pl_module, "net", pl_module)


def _is_rank_zero(trainer: Trainer | None) -> bool:
    return trainer is None or trainer.is_global_zero


def log_sparsity(trainer: Trainer | None, stats: dict, prefix: str = "prune") -> None:
    if trainer is None or not trainer.loggers:
        return
    metrics = {f"{prefix}/sparsity": stats["sparsity"], f"{prefix}/nonzero": float(stats["nonzero"])}
    metrics.update({f"{prefix}/sparsity/{n}": v["sparsity"] for n, v in stats["layers"].items()})
    for lg in trainer.loggers:
        lg.log_metrics(metrics, step=trainer.global_step)


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
        log_sparsity(trainer, stats)
        return stats

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.when == "fit_start":
            self.prune(pl_module, trainer)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.when == "fit_end":
            self.prune(pl_module, trainer)


def _memory_format(model: nn.Module) -> torch.memory_format:
    """channels_last when the model's 4-D weights are laid out NHWC, else contiguous."""
    w = next((p for p in model.parameters() if p.dim() == 4), None)
    if w is not None and not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class RatioSearch(Callback):
    """After fit, search the highest pruning ratio within ``tolerance`` points of the dense
    validation accuracy. Magnitude and 2:4 leave the module pruned in place; a channel-pruned
    network is a new module, available as ``self.model`` (and swapped into ``pl_module.net``)."""

    def __init__(
        self,
        tolerance: float = 1.0,
        rule: str = "contiguous",
        grid: Sequence[float] = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
        refine_step: float | None = 0.01,
        scope: str = "global",
        exact: bool = False,
        batch_size: int = 128,
        precision: str | None = None,
        journal_path: str | None = None,
        method: str = "magnitude",
        pruner_options: dict | None = None,
        full_curve: bool = False,
        fast_eval: bool = True,
    ):
        if tolerance < 0:
            raise ValueError(f"search.tolerance must be >= 0, got {tolerance}")
        if rule not in RULES:
            raise ValueError(f"search.rule must be one of {RULES}, got {rule!r}")
        if scope not in SCOPES:
            raise ValueError(f"prune.scope must be one of {SCOPES}, got {scope!r}")
        if not grid or any(not 0.0 <= r < 1.0 for r in grid):
            raise ValueError(f"search.grid must hold ratios in [0, 1), got {list(grid)}")
        self.tolerance, self.rule, self.grid = float(tolerance), rule, [float(r) for r in grid]
        self.refine_step, self.scope, self.exact = refine_step, scope, exact
        self.batch_size, self.precision, self.journal_path = batch_size, precision, journal_path
        if method not in METHODS:
            raise ValueError(f"prune.method must be one of {METHODS}, got {method!r}")
        self.method, self.pruner_options = method, dict(pruner_options or {})
        self.full_curve = bool(full_curve)
        self.fast_eval = bool(fast_eval)
        self.model: nn.Module | None = None
        self.result: SearchResult | None = None
        self.seconds: float | None = None
        self.pruner: MagnitudePruner | None = None
        self.resumed = 0

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        dm = trainer.datamodule
        self.run(_net(pl_module), dm.val_set, pl_module.device, trainer)
        if hasattr(pl_module, "net"):
            pl_module.net = self.model

    def _evaluation_view(self, model: nn.Module, image_hw: tuple[int, int]):
        """How candidates are evaluated. With ``fast_eval``: NHWC (channels-last) weights and
        batches, and the average pool folded into ``classifier[0]`` where that is exact (a VGG
        whose features end at 1x1, as at 32x32). Same function, same predictions up to float
        rounding; together ~1.9x faster per pass on VGG16 on the 2-core CPU."""
        if not self.fast_eval:
            return (lambda m: m), None
        from prunelab.export import folded_view

        def to_nhwc(x: torch.Tensor) -> torch.Tensor:
            return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x

        try:
            folded_view(model, image_hw)
        except ValueError as exc:
            log.debug("search evaluates unfolded: %s", exc)
            return (lambda m: m.to(memory_format=torch.channels_last)), to_nhwc
        return (lambda m: folded_view(m.to(memory_format=torch.channels_last), image_hw)), to_nhwc

    def run(self, model: nn.Module, val_set: Dataset, device: torch.device, trainer: Trainer | None = None,
            dense: Evaluation | None = None, identity: dict | None = None) -> SearchResult:
        t0 = time.perf_counter()
        layout = _memory_format(model)
        model.to(device)
        loader, total = shard_loader(val_set, self.batch_size)
        as_evaluated, batch_transform = self._evaluation_view(model, tuple(val_set[0][0].shape[-2:]))
        if self.fast_eval:
            # In place, before the pruner copies the weights, so every candidate is NHWC already;
            # the chosen model is handed back in the caller's layout.
            model.to(memory_format=torch.channels_last)
        if dense is None:
            c = count_correct(as_evaluated(model), loader, total, device=device, precision=self.precision,
                              batch_transform=batch_transform)
            dense = Evaluation(0.0, c.correct, c.seen, c.total)
        dense_acc = dense.acc
        pruner = make_pruner(self.method, model, self.scope, **self.pruner_options)
        pruner.prepare(search_ratios(self.grid, self.refine_step))
        journal = Journal(self.journal_path if _is_rank_zero(trainer) else None,
                          dict(identity or {}, dense_correct=dense.correct, scope=self.scope, method=self.method,
                               tolerance=self.tolerance, exact=self.exact, options=self.pruner_options,
                               fast_eval=self.fast_eval))

        def evaluate(ratio: float, max_errors: int | None) -> Evaluation:
            m = as_evaluated(pruner.apply(ratio).to(device))
            c = count_correct(m, loader, total, max_errors=max_errors, device=device, precision=self.precision,
                              batch_transform=batch_transform)
            stats = pruner.stats()
            e = Evaluation(ratio, c.correct, c.seen, c.total, c.stopped, stats["nonzero"],
                           extra=candidate_extra(self.method, stats))
            if trainer is None or trainer.is_global_zero:
                log.info("ratio %.2f: val acc %s%.2f%% (%d/%d images)", ratio, "<= " if c.stopped else "",
                         e.acc, c.seen, c.total)
            if trainer is not None:
                for lg in trainer.loggers:
                    lg.log_metrics({"search/ratio": ratio, "search/val_acc": e.acc}, step=int(round(ratio * 100)))
            return e

        self.resumed = len(journal.entries)
        self.result = search(evaluate, dense_acc, self.grid, self.tolerance, self.rule, self.refine_step,
                             exact=self.exact, total=total, known=journal.entries, on_result=journal.record,
                             full_curve=self.full_curve)
        self.model = pruner.finish(self.result.best_ratio).to(device, memory_format=layout)
        if self.model is not model:
            model.to(memory_format=layout)
        self.pruner = pruner
        log_sparsity(trainer, pruner.stats())
        self.seconds = time.perf_counter() - t0
        return self.result
