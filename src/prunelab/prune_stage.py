"""The prune stage of a run: search or fixed ratio, one-shot or iterative with recovery, for
every method; returns the pruned network and what the report says about it."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lightning import LightningDataModule
from omegaconf import DictConfig
from torch import nn

from prunelab.callbacks import MaskKeeper
from prunelab.errors import ConfigError
from prunelab.evaluation import count_correct, shard_loader
from prunelab.io import compressed_bytes
from prunelab.models import ImageClassifier
from prunelab.pruning import registry
from prunelab.pruning.channel import count_macs, default_example
from prunelab.pruning.masks import prunable_weights, sparsity
from prunelab.pruning.registry import make_pruner
from prunelab.pruning.spec import PruneSpec, prune_spec
from prunelab.report.stats import wilson_interval
from prunelab.search.across import oneshot_walk, search_across
from prunelab.search.iterative import iterative, iterative_search, schedule
from prunelab.search.oneshot import OneShotSearch
from prunelab.search.rules import Evaluation, SearchResult, pass_threshold
from prunelab.search.spec import SearchSpec, search_spec
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
    method: str = "magnitude"  # the chosen model's method (a search across methods picks one)
    notes: list[str] = field(default_factory=list)  # for the report


def recover_fn(cfg: DictConfig, dm: LightningDataModule, device):
    """Recovery fine-tuning after a pruning step: ``prune.recover_epochs`` on the training split,
    with the run's trainer settings, pruned weights held at zero by ``MaskKeeper``."""
    p = prune_spec(cfg)

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


def search_report(result: SearchResult, p: PruneSpec, schedule_name: str, resumed: int = 0) -> dict:
    """The report's ``search`` section, for one-shot and iterative searches alike."""
    return dict(result.to_dict(), scope=p.scope, schedule=schedule_name, resumed_candidates=resumed)


def candidate_figures(method: str, candidate: nn.Module, example: torch.Tensor,
                      time_pair: Callable[[nn.Module, str], dict] | None) -> dict:
    """What a passing candidate is ranked on besides accuracy: deploy-runtime latency (timed in
    turns with the dense model by ``time_pair``), bytes of its compact file, MACs for one image,
    and its nonzero parameters (zeroed weights do not count, removed channels are gone)."""
    state = {k: v.detach().cpu() for k, v in candidate.state_dict().items()}
    zeros = sum(int(w.numel() - torch.count_nonzero(w)) for w in prunable_weights(candidate).values())
    figures = {"bytes": compressed_bytes(state), "macs": count_macs(candidate, example),
               "params": sum(q.numel() for q in candidate.parameters()) - zeros}
    if time_pair is not None:
        figures.update(time_pair(candidate, method))
    return figures


def _search_across(cfg: DictConfig, p: PruneSpec, s: SearchSpec, net: nn.Module, dm: LightningDataModule, device,
                   precision: str, dense_val: tuple[int, int], dense_hits, journal_dir: Path | None, identity: dict,
                   memory_format, loggers, rank_zero, time_pair, time_together) -> PruneOutcome:
    t0 = time.perf_counter()
    opts = p.pruner_options()
    example = default_example(net).to(device)

    def make_search(method: str) -> OneShotSearch:
        journal = journal_dir / f"journal-{s.objective}-{method}-{p.scope}.json" if journal_dir else None
        return OneShotSearch(s.tolerance, "contiguous", list(s.grid), s.refine_step, p.scope, s.exact,
                             dm.eval_batch_size, precision, journal_path=str(journal) if journal else None,
                             method=method, pruner_options={k: v for k, v in opts.items() if k != "scope"},
                             full_curve=False, fast_eval=bool(s.fast_eval), memory_format=memory_format,
                             confidence=s.confidence)

    methods, skipped = list(s.methods), {}
    if s.objective == "latency" and not s.walk_all:
        # A method that runs the dense kernels on this device cannot be the fastest model: walking
        # it would only cost time (search.walk_all=true walks it anyway, for the Pareto front).
        skipped = {m: "runs the dense kernels on this device: cannot be faster than the dense model"
                   for m in methods if not registry.speeds_up(m, torch.device(device).type)}
        methods = [m for m in methods if m not in skipped]
    dense = Evaluation(0.0, dense_val[0], dense_val[1], dense_val[1])
    recovered: dict[tuple[str, float], nn.Module] = {}
    if p.schedule == "iterative":
        recover, evaluate = recover_fn(cfg, dm, device), _evaluate_fn(dm, device, precision)

        def walk(method: str, start: nn.Module, measure):
            # A recovered model cannot be rebuilt from a ranking: keep every passing one, so the
            # chosen model is exactly the one measured.
            _, result = iterative_search(start, method, s.grid, dense.acc, s.tolerance, recover, evaluate, opts,
                                         measure=measure,
                                         on_pass=lambda ratio, model: recovered.__setitem__((method, ratio), model))
            return result, 0
    else:
        walk = oneshot_walk(make_search, dm.val_set, device, dense, dense_hits, dict(identity, objective=s.objective),
                            loggers, rank_zero)
    def retime(rows: list[dict]) -> dict:
        # The shortlist's models again, exactly as measured: rebuilt from the ranking (one-shot) or
        # the recovered model kept by the iterative walk.
        nets = {}
        for i, c in enumerate(rows):
            model = (recovered[(c["method"], c["ratio"])] if p.schedule == "iterative"
                     else make_pruner(c["method"], copy.deepcopy(net), **opts).finish(c["ratio"]))
            nets[f"c{i}"] = (model.to(device, memory_format=memory_format), c["method"])
        return time_together(nets)

    networks: dict[str, dict] = {}

    def measure(method: str, candidate: nn.Module) -> dict:
        # The same network is one candidate: measured (and timed) once. Not across recoveries,
        # which leave the same shapes with other weights.
        arch = registry.architecture_key(method, candidate) if p.schedule != "iterative" else None
        if arch is not None and arch in networks:
            return dict(networks[arch], timed="the same network as an earlier candidate: not timed again")
        figures = candidate_figures(method, candidate, example, time_pair)
        if arch is not None:
            figures["architecture"] = arch
            networks[arch] = figures
        return figures

    result = search_across(net, methods, walk, s.objective, measure,
                           retime=retime if time_together is not None else None,
                           final_round=s.final_round)
    dense_acc = dense.acc
    search = dict(result.to_dict(), tolerance=s.tolerance, dense_val_acc=dense_acc,
                  threshold=pass_threshold(dense_acc, s.tolerance), confidence=s.confidence, scope=p.scope,
                  schedule=p.schedule, skipped_methods=skipped,
                  best_ratio=result.chosen["ratio"] if result.chosen else 0.0,
                  best_method=result.chosen["method"] if result.chosen else None)
    if result.chosen is None:
        return PruneOutcome(net, 0.0, dense_val, sparsity(prunable_weights(net)), search, [],
                            time.perf_counter() - t0, method=p.method)
    chosen = result.chosen
    val = (round(chosen["val_acc"] * dense_val[1] / 100.0), dense_val[1])
    if p.schedule == "iterative":
        pruned = recovered[(chosen["method"], chosen["ratio"])]
        recovered.clear()
        stats = registry.stats(chosen["method"], pruned, net)
        return PruneOutcome(pruned.to(device, memory_format=memory_format), chosen["ratio"], val, stats, search, [],
                            time.perf_counter() - t0, method=chosen["method"])
    pruner = make_pruner(chosen["method"], copy.deepcopy(net), **opts)
    pruned = pruner.finish(chosen["ratio"]).to(device, memory_format=memory_format)
    return PruneOutcome(pruned, chosen["ratio"], val, pruner.stats(), search, [], time.perf_counter() - t0,
                        method=chosen["method"])


ABOVE_CHANCE = 5.0  # points: a dense model not surely this far above chance is not worth searching


def searchable_problem(dense_val: tuple[int, int], num_classes: int, tolerance: float) -> str | None:
    """Why a search's answer would mean nothing, or None (``run_prune_stage`` refuses the search
    unless ``search.allow_weak_model=true``, which searches anyway and notes it in the report).

    - The dense model is weak: the lower end of its validation accuracy's 95% Wilson interval is not
      more than ``ABOVE_CHANCE`` points above chance (100 / classes). Then almost any pruning
      "stays within the tolerance" of a model that has learnt next to nothing.
    - The validation split cannot resolve the tolerance: one image is worth 100 / n points, and a
      single disagreement between dense and candidate (the narrowest nonzero paired interval)
      already spans more than ``search.tolerance``; the verdicts are then decided by one image.
    """
    correct, n = dense_val
    if n <= 0:
        return "the validation split is empty: use more data (data.train_size, data.val_fraction)"
    per_image = 100.0 / n
    if per_image > tolerance:
        return (
            f"the validation split has {n} image{'s' if n != 1 else ''}: one image is worth {per_image:.2f} points, "
            f"more than search.tolerance={tolerance:g}, so single images decide every verdict; use more data "
            f"(data.train_size, data.val_fraction), a tolerance of at least {per_image:.2f}, or "
            "search.allow_weak_model=true to search anyway")
    chance = 100.0 / num_classes
    lo, _ = wilson_interval(correct, n)
    if lo <= chance + ABOVE_CHANCE:
        return (
            f"the dense model scores {100.0 * correct / n:.2f}% on validation (95% interval from {lo:.2f}%), not "
            f"surely {ABOVE_CHANCE:g} points above chance ({chance:.2f}% for {num_classes} classes): pruning it "
            "would measure nothing; train longer (trainer.max_epochs), use more data or pretrained weights, or set "
            "search.allow_weak_model=true to search anyway")
    return None


def run_prune_stage(cfg: DictConfig, net: nn.Module, dm: LightningDataModule, device, precision: str,
                    dense_val: tuple[int, int], journal_path: Path | None, identity: dict,
                    memory_format: torch.memory_format = torch.contiguous_format, loggers=(),
                    rank_zero: bool = True, dense_hits: torch.Tensor | None = None,
                    time_pair: Callable[[nn.Module, str], dict] | None = None,
                    time_together: Callable[[dict], dict] | None = None) -> PruneOutcome:
    """``time_pair(candidate, method)`` times a candidate in turns with the dense model in the
    run's latency runtime (used when ``search.objective`` ranks by more than the ratio);
    ``time_together({name: (network, method)})`` times a latency search's shortlist all in turns
    with the dense model in one session (``deploy.time_together``'s result)."""
    p, s = prune_spec(cfg), search_spec(cfg)
    problem = searchable_problem(dense_val, int(cfg.model.num_classes), float(s.tolerance)) \
        if p.ratio is None else None
    if problem and not s.allow_weak_model:
        raise ConfigError(problem)
    outcome = _run(cfg, p, s, net, dm, device, precision, dense_val, journal_path, identity, memory_format, loggers,
                   rank_zero, dense_hits, time_pair, time_together)
    if problem:
        outcome.notes.append("search.allow_weak_model=true searched although " + problem.split("; ")[0]
                             + ": the chosen ratio means little.")
    return outcome


def _run(cfg, p, s, net, dm, device, precision, dense_val, journal_path, identity, memory_format, loggers, rank_zero,
         dense_hits, time_pair, time_together) -> PruneOutcome:
    if p.ratio is None and s.across_methods:
        return _search_across(cfg, p, s, net, dm, device, precision, dense_val, dense_hits,
                              journal_path.parent if journal_path else None, identity, memory_format, loggers,
                              rank_zero, time_pair, time_together)
    t0 = time.perf_counter()
    opts = p.pruner_options()
    evaluate = _evaluate_fn(dm, device, precision)
    dense_acc = 100.0 * dense_val[0] / dense_val[1]

    if p.schedule == "iterative":
        recover = recover_fn(cfg, dm, device)
        if p.ratio is None:
            pruned, result = iterative_search(net, p.method, s.grid, dense_acc, s.tolerance, recover, evaluate, opts)
            ratio, search, history = result.best_ratio, search_report(result, p, "iterative"), []
        else:
            pruned, steps = iterative(net, p.method, schedule(float(p.ratio), p.steps), recover, evaluate, opts)
            ratio, search, history = float(p.ratio), None, [st.to_dict() for st in steps]
        final = evaluate(pruned)
        stats = registry.stats(p.method, pruned, net)
        return PruneOutcome(pruned, ratio, (final.correct, final.total), stats, search, history,
                            time.perf_counter() - t0, method=p.method)

    if p.ratio is None:
        searcher = OneShotSearch(s.tolerance, s.rule, list(s.grid), s.refine_step, p.scope, s.exact,
                                 dm.eval_batch_size, precision, journal_path=str(journal_path) if journal_path else None,
                                 method=p.method, pruner_options={k: v for k, v in opts.items() if k != "scope"},
                                 full_curve=bool(s.full_curve), fast_eval=bool(s.fast_eval),
                                 memory_format=memory_format, confidence=s.confidence)
        dense = Evaluation(0.0, dense_val[0], dense_val[1], dense_val[1])
        result = searcher.run(net, dm.val_set, device, dense=dense, identity=identity, loggers=loggers,
                              rank_zero=rank_zero, dense_hits=dense_hits)
        ratio = result.best_ratio
        chosen = [e for e in result.curve if e.ratio == ratio]
        val = (chosen[0].correct, chosen[0].total) if chosen else dense_val
        search = search_report(result, p, "oneshot", searcher.resumed)
        return PruneOutcome(searcher.model, ratio, val, searcher.pruner.stats(), search, [], time.perf_counter() - t0,
                            method=p.method)

    pruner = make_pruner(p.method, net, **opts)
    pruned = pruner.finish(float(p.ratio)).to(device)
    final = evaluate(pruned)
    return PruneOutcome(pruned, float(p.ratio), (final.correct, final.total), pruner.stats(), None, [],
                        time.perf_counter() - t0, method=p.method)


__all__ = ["PruneOutcome", "recover_fn", "run_prune_stage", "search_report"]
