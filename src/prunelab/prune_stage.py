"""The prune stage of a run: search or fixed ratio, one-shot or iterative with recovery, for
every method; returns the pruned network and what the report says about it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lightning import LightningDataModule
from omegaconf import DictConfig
from torch import nn

from prunelab.callbacks import MaskKeeper
from prunelab.evaluation import count_correct, shard_loader
from prunelab.models import ImageClassifier
from prunelab.pruning.channel import channel_stats
from prunelab.pruning.masks import prunable_weights, sparsity
from prunelab.pruning.registry import make_pruner
from prunelab.search.iterative import iterative, iterative_search, schedule
from prunelab.search.oneshot import OneShotSearch
from prunelab.search.rules import Evaluation, SearchResult
from prunelab.trainer import build_trainer


@dataclass
class PruneOutcome:
    net: nn.Module
    ratio: float
    val: tuple[int, int]
    stats: dict
    search: dict | None = None
    schedule: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def pruner_options(cfg: DictConfig) -> dict:
    """The ``prune.*`` settings every pruner is built from (each method takes what it needs)."""
    p = cfg.prune
    return {"scope": p.scope, "importance": p.importance, "normalize": p.normalize, "min_channels": p.min_channels,
            "round_to": p.round_to}


def recover_fn(cfg: DictConfig, dm: LightningDataModule, device):
    """Recovery fine-tuning after a pruning step: ``prune.recover_epochs`` on the training split,
    with the run's trainer settings, pruned weights held at zero by ``MaskKeeper``."""
    p = cfg.prune

    def recover(net: nn.Module, masks: dict | None) -> nn.Module:
        if p.recover_epochs <= 0:
            return net
        module = ImageClassifier(net=net, num_classes=cfg.model.num_classes, lr=p.recover_lr,
                                 momentum=cfg.model.momentum, weight_decay=cfg.model.weight_decay)
        trainer = build_trainer(cfg, callbacks=[MaskKeeper(masks)], with_config_callbacks=False, logger=False,
                                devices=1, max_epochs=p.recover_epochs, limit_val_batches=0, num_sanity_val_steps=0,
                                enable_checkpointing=False, enable_model_summary=False)
        trainer.fit(module, datamodule=dm)
        return module.net.to(device)

    return recover


def _evaluate_fn(dm: LightningDataModule, device, precision: str):
    loader, total = shard_loader(dm.val_set, dm.eval_batch_size)

    def evaluate(net: nn.Module) -> Evaluation:
        c = count_correct(net.to(device), loader, total, device=device, precision=precision)
        return Evaluation(0.0, c.correct, c.seen, c.total)

    return evaluate


def search_report(result: SearchResult, cfg: DictConfig, schedule_name: str, resumed: int = 0) -> dict:
    """The report's ``search`` section, for one-shot and iterative searches alike."""
    return dict(result.to_dict(), scope=cfg.prune.scope, schedule=schedule_name, resumed_candidates=resumed)


def run_prune_stage(cfg: DictConfig, net: nn.Module, dm: LightningDataModule, device, precision: str,
                    dense_val: tuple[int, int], journal_path: Path | None, identity: dict,
                    memory_format: torch.memory_format = torch.contiguous_format, loggers=(),
                    rank_zero: bool = True) -> PruneOutcome:
    p, s = cfg.prune, cfg.search
    t0 = time.perf_counter()
    opts = pruner_options(cfg)
    evaluate = _evaluate_fn(dm, device, precision)
    dense_acc = 100.0 * dense_val[0] / dense_val[1]

    if p.schedule == "iterative":
        recover = recover_fn(cfg, dm, device)
        if p.ratio is None:
            pruned, result = iterative_search(net, p.method, s.grid, dense_acc, s.tolerance, recover, evaluate, opts)
            ratio, search, history = result.best_ratio, search_report(result, cfg, "iterative"), []
        else:
            pruned, steps = iterative(net, p.method, schedule(float(p.ratio), p.steps), recover, evaluate, opts)
            ratio, search, history = float(p.ratio), None, [st.to_dict() for st in steps]
        final = evaluate(pruned)
        stats = channel_stats(pruned, net) if p.method == "channel" else sparsity(prunable_weights(pruned))
        return PruneOutcome(pruned, ratio, (final.correct, final.total), stats, search, history,
                            time.perf_counter() - t0)

    if p.ratio is None:
        searcher = OneShotSearch(s.tolerance, s.rule, list(s.grid), s.refine_step, p.scope, s.exact,
                                 dm.eval_batch_size, precision, journal_path=str(journal_path) if journal_path else None,
                                 method=p.method, pruner_options={k: v for k, v in opts.items() if k != "scope"},
                                 full_curve=bool(s.full_curve), fast_eval=bool(s.fast_eval),
                                 memory_format=memory_format)
        dense = Evaluation(0.0, dense_val[0], dense_val[1], dense_val[1])
        result = searcher.run(net, dm.val_set, device, dense=dense, identity=identity, loggers=loggers,
                              rank_zero=rank_zero)
        ratio = result.best_ratio
        chosen = [e for e in result.curve if e.ratio == ratio]
        val = (chosen[0].correct, chosen[0].total) if chosen else dense_val
        search = search_report(result, cfg, "oneshot", searcher.resumed)
        return PruneOutcome(searcher.model, ratio, val, searcher.pruner.stats(), search, [], time.perf_counter() - t0)

    pruner = make_pruner(p.method, net, **opts)
    pruned = pruner.finish(float(p.ratio)).to(device)
    final = evaluate(pruned)
    return PruneOutcome(pruned, float(p.ratio), (final.correct, final.total), pruner.stats(), None, [],
                        time.perf_counter() - t0)


__all__ = ["PruneOutcome", "pruner_options", "recover_fn", "run_prune_stage", "search_report"]
