"""The prune stage of a run: search or fixed ratio, one-shot or iterative with recovery, for
every method; returns the pruned network and what the report says about it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lightning import LightningDataModule, Trainer
from omegaconf import DictConfig
from torch import nn

from prunelab.evaluation import count_correct, shard_loader
from prunelab.models import ImageClassifier
from prunelab.pruning.callbacks import MaskKeeper, RatioSearch
from prunelab.pruning.masks import prunable_weights, sparsity
from prunelab.pruning.recovery import iterative, iterative_search, schedule
from prunelab.pruning.registry import make_pruner
from prunelab.pruning.search import Evaluation


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
    p = cfg.prune
    return {"scope": p.scope, "importance": p.importance, "normalize": p.normalize, "min_channels": p.min_channels,
            "round_to": p.get("round_to", 1)}


def _recover_fn(cfg: DictConfig, dm: LightningDataModule, device):
    p, t = cfg.prune, cfg.trainer

    def recover(net: nn.Module, masks: dict | None) -> nn.Module:
        if p.recover_epochs <= 0:
            return net
        module = ImageClassifier(net=net, num_classes=cfg.model.num_classes, lr=p.recover_lr,
                                 momentum=cfg.model.momentum, weight_decay=cfg.model.weight_decay)
        trainer = Trainer(accelerator=t.accelerator, devices=1, precision=t.precision, max_epochs=p.recover_epochs,
                          limit_train_batches=t.limit_train_batches, limit_val_batches=0, num_sanity_val_steps=0,
                          logger=False, enable_checkpointing=False, enable_progress_bar=t.enable_progress_bar,
                          enable_model_summary=False, callbacks=[MaskKeeper(masks)])
        trainer.fit(module, datamodule=dm)
        return module.net.to(device)

    return recover


def _evaluate_fn(dm: LightningDataModule, device, precision: str):
    loader, total = shard_loader(dm.val_set, dm.eval_batch_size)

    def evaluate(net: nn.Module) -> Evaluation:
        c = count_correct(net.to(device), loader, total, device=device, precision=precision)
        return Evaluation(0.0, c.correct, c.seen, c.total)

    return evaluate


def run_prune_stage(cfg: DictConfig, net: nn.Module, dm: LightningDataModule, device, precision: str,
                    trainer: Trainer, dense_val: tuple[int, int], journal_path: Path | None,
                    identity: dict) -> PruneOutcome:
    p, s = cfg.prune, cfg.search
    t0 = time.perf_counter()
    opts = pruner_options(cfg)
    evaluate = _evaluate_fn(dm, device, precision)

    if p.schedule == "iterative":
        recover = _recover_fn(cfg, dm, device)
        if p.ratio is None:
            threshold = 100.0 * dense_val[0] / dense_val[1] - s.tolerance
            pruned, ratio, steps = iterative_search(net, p.method, s.grid, threshold, recover, evaluate, opts)
            curve = [st.to_dict(threshold) for st in steps]
            search = {"tolerance": s.tolerance, "rule": "contiguous", "scope": p.scope, "schedule": "iterative",
                      "dense_val_acc": 100.0 * dense_val[0] / dense_val[1], "threshold": threshold,
                      "best_ratio": ratio, "best_ratio_contiguous": ratio,
                      "best_ratio_highest": max([c["ratio"] for c in curve if c["passed"]], default=0.0),
                      "curve": curve, "images_evaluated": sum(c["seen"] for c in curve) * 2, "resumed_candidates": 0}
        else:
            pruned, steps = iterative(net, p.method, schedule(float(p.ratio), p.steps), recover, evaluate, opts)
            ratio, search = float(p.ratio), None
        final = evaluate(pruned)
        stats = _channel_stats(pruned, net) if p.method == "channel" else sparsity(prunable_weights(pruned))
        history = [] if search is not None else [st.to_dict() for st in steps]  # a search shows it as its curve
        return PruneOutcome(pruned, ratio, (final.correct, final.total), stats, search, history,
                            time.perf_counter() - t0)

    if p.ratio is None:
        searcher = RatioSearch(s.tolerance, s.rule, list(s.grid), s.refine_step, p.scope, s.exact,
                               dm.eval_batch_size, precision, journal_path=str(journal_path) if journal_path else None,
                               method=p.method, pruner_options={k: v for k, v in opts.items() if k != "scope"},
                               full_curve=bool(s.get("full_curve", False)), fast_eval=bool(s.get("fast_eval", True)))
        dense = Evaluation(0.0, dense_val[0], dense_val[1], dense_val[1])
        result = searcher.run(net, dm.val_set, device, trainer, dense=dense, identity=identity)
        ratio = result.best_ratio
        chosen = [e for e in result.curve if e.ratio == ratio]
        val = (chosen[0].correct, chosen[0].total) if chosen else dense_val
        search = dict(result.to_dict(), scope=p.scope, schedule="oneshot",
                      images_evaluated=sum(e.seen for e in result.curve), resumed_candidates=searcher.resumed)
        stats = searcher.pruner.stats()
        return PruneOutcome(searcher.model, ratio, val, stats, search, [], time.perf_counter() - t0)

    pruner = make_pruner(p.method, net, **opts)
    pruned = pruner.finish(float(p.ratio)).to(device)
    final = evaluate(pruned)
    return PruneOutcome(pruned, float(p.ratio), (final.correct, final.total), pruner.stats(), None, [],
                        time.perf_counter() - t0)


def _channel_stats(pruned: nn.Module, dense: nn.Module) -> dict:
    from prunelab.pruning.channel import (
        conv_channels,
        count_macs,
        default_example,
        prunable_convs,
        removed_fraction,
    )

    example = default_example(dense).to(next(dense.parameters()).device)
    dense_w = {n: w.numel() for n, w in prunable_weights(dense).items()}
    layers = {}
    for name, w in prunable_weights(pruned).items():
        zeros = dense_w[name] - int(torch.count_nonzero(w))
        layers[name] = {"params": dense_w[name], "zeros": zeros, "sparsity": zeros / dense_w[name]}
    total = sum(dense_w.values())
    nonzero = total - sum(v["zeros"] for v in layers.values())
    return {"params": sum(q.numel() for q in pruned.parameters()), "macs": count_macs(pruned, example),
            "dense_macs": count_macs(dense, example), "nonzero": nonzero, "zeros": total - nonzero,
            "sparsity": 1 - nonzero / total, "channels": conv_channels(pruned),
            "channels_removed": removed_fraction(conv_channels(pruned), {n: c.out_channels for n, c in
                                                                         prunable_convs(dense, example).items()}),
            "layers": layers}


__all__ = ["PruneOutcome", "run_prune_stage"]
