"""The prune stage of a run: search or fixed ratio, one-shot or iterative with recovery, for
every method; returns the pruned network and what the report says about it.

Every path reads one :class:`PruneJob` (the ``prune`` and ``search`` specs, the network, the data,
the timing callables); ``run_prune_stage`` picks the path: a search across methods (any objective
but sparsity), the iterative schedule, the one-shot ratio search, or a fixed ratio.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lightning import LightningDataModule
from omegaconf import DictConfig
from torch import nn

from prunelab.callbacks.pruning import MaskKeeper
from prunelab.errors import ConfigError
from prunelab.evaluation import count_correct, shard_loader
from prunelab.io import compressed_bytes
from prunelab.models import ImageClassifier
from prunelab.models.rewrite import folded_copy
from prunelab.pruning import registry
from prunelab.pruning.channel import default_example
from prunelab.pruning.costs import count_macs
from prunelab.pruning.masks import prunable_weights, sparsity
from prunelab.pruning.registry import make_pruner
from prunelab.pruning.spec import PruneSpec, prune_spec
from prunelab.pruning.taylor import Calibration, with_calibration
from prunelab.report.stats import wilson_interval
from prunelab.search.across import oneshot_walk, search_across
from prunelab.search.iterative import iterative, iterative_search, schedule
from prunelab.search.oneshot import OneShotSearch, pair_with_dense
from prunelab.search.rules import Evaluation, SearchResult, pass_threshold
from prunelab.search.spec import SearchSpec
from prunelab.trainer import build_trainer

log = logging.getLogger(__name__)


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


@dataclass
class PruneJob:
    """What every path of the prune stage reads. ``time_pair(candidate, method)`` times a candidate
    in turns with the dense model in the run's latency runtime (a search ranking by more than the
    ratio); ``time_together({name: (network, method)})`` times a latency search's shortlist all in
    turns with the dense model in one session (``deploy.time_together``'s result); both None where
    latency is not timed."""

    cfg: DictConfig  # the model and trainer settings a recovery fine-tune is built from
    prune: PruneSpec
    search: SearchSpec
    net: nn.Module
    dm: LightningDataModule
    device: torch.device
    precision: str
    dense_val: tuple[int, int]  # (correct, images) of the dense model on validation
    journal_path: Path | None = None
    identity: dict = field(default_factory=dict)  # what a journal entry must match to be reused
    memory_format: torch.memory_format = torch.contiguous_format
    loggers: tuple = ()
    rank_zero: bool = True
    dense_hits: torch.Tensor | None = None  # the dense model's per-image correctness on validation
    time_pair: Callable[[nn.Module, str], dict] | None = None
    time_together: Callable[[dict], dict] | None = None
    calibration: Calibration | None = None  # a Taylor ranking's training images, drawn once per job

    def pruner_options(self) -> dict:
        """What ``make_pruner`` takes: the prune spec's options, with the calibration images where
        the ranking needs them (``prune.importance=taylor``)."""
        opts = with_calibration(self.prune.pruner_options(), self.dm, self.calibration)
        self.calibration = opts.get("calibration", self.calibration)
        return opts

    @property
    def dense(self) -> Evaluation:
        return Evaluation(0.0, self.dense_val[0], self.dense_val[1], self.dense_val[1])

    def oneshot(self, method: str, rule: str, full_curve: bool, journal: Path | None) -> OneShotSearch:
        """The one-shot walk of ``method`` under this job's settings."""
        p, s = self.prune, self.search
        options = {k: v for k, v in self.pruner_options().items() if k != "scope"}
        return OneShotSearch(s.tolerance, rule, list(s.grid), s.refine_step, p.scope, s.exact, self.dm.eval_batch_size,
                             self.precision, journal_path=str(journal) if journal else None, method=method,
                             pruner_options=options, full_curve=full_curve, fast_eval=bool(s.fast_eval),
                             memory_format=self.memory_format, confidence=s.confidence)


def recovery_module(cfg: DictConfig, net: nn.Module, p: PruneSpec, masks: dict | None = None,
                    teacher: nn.Module | None = None) -> ImageClassifier:
    """The network wrapped for one recovery: the model's optimiser (momentum, Nesterov, weight
    decay) and label smoothing, ``prune.recover_lr`` down ``prune.recover_schedule``. A constant
    lr with plain cross-entropy leaves a pruned model noisier than it found it; the cosine to zero
    ends the recovery on its best weights. It trains folded where the model does
    (``model.fold_classifier``) and no mask holds ``classifier.0``: a channel-pruned VGG recovers
    in the folded form, a masked classifier in its own. With ``prune.recover_distill`` the dense
    model (``teacher``) teaches it as well."""
    m = cfg.model
    fold = m.get("fold_classifier") is True and "classifier.0" not in (masks or {}) \
        and isinstance(getattr(net, "avgpool", None), nn.AdaptiveAvgPool2d)
    return ImageClassifier(net=net, num_classes=m.num_classes, lr=p.recover_lr, momentum=m.momentum,
                           weight_decay=m.weight_decay, nesterov=bool(m.get("nesterov", False)),
                           label_smoothing=float(m.get("label_smoothing", 0.0)), schedule=p.recover_schedule,
                           fold_classifier=fold, distill=p.recover_distill if teacher is not None else 0.0,
                           distill_temperature=p.recover_temperature, teacher=teacher)


def recovery_batches(epochs: float, configured):
    """``limit_train_batches`` for a recovery of ``epochs``: the trainer's own for whole epochs; a
    fraction of it for a fraction of one (``trainer.limit_train_batches`` an int stays an int)."""
    if float(epochs).is_integer():
        return configured
    if configured is None or configured == 1.0:
        return float(epochs)
    if isinstance(configured, int):
        return max(1, round(configured * epochs))
    return float(configured) * epochs


def recover_fn(cfg: DictConfig, dm: LightningDataModule, device, p: PruneSpec | None = None, callbacks=(),
               dense: nn.Module | None = None):
    """Recovery fine-tuning after pruning step ``step``: its ``prune.recover_epochs`` on the training split
    (``recovery_module``), with the run's trainer settings, pruned weights held at zero by
    ``MaskKeeper``; ``dense`` teaches it where ``prune.recover_distill`` > 0 (a copy, its pool
    folded where exact: the teacher's forward is the cheapest form of the same function)."""
    p = p or prune_spec(cfg)
    teacher = folded_copy(dense)[0] if dense is not None and p.recover_distill > 0 else None

    def recover(net: nn.Module, masks: dict | None, step: int = 0) -> nn.Module:
        epochs = p.recover_epochs_at(step)
        if epochs <= 0:
            return net
        log.info("recovering pruning step %d for %s epoch(s)", step + 1, epochs)
        module = recovery_module(cfg, net, p, masks, teacher)
        trainer = build_trainer(cfg, callbacks=[MaskKeeper(masks), *callbacks], with_config_callbacks=False,
                                logger=False, devices=1, max_epochs=max(1, int(epochs)),
                                limit_train_batches=recovery_batches(epochs, cfg.trainer.get("limit_train_batches")),
                                limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=False,
                                enable_model_summary=False)
        trainer.fit(module, datamodule=dm)
        return module.net.to(device)

    return recover


def _evaluate_fn(job: PruneJob):
    """Each recovered model's validation result, paired against the dense model on the same images
    (so ``search.confidence`` judges recovered steps as it judges one-shot candidates)."""
    loader, total = shard_loader(job.dm.val_set, job.dm.eval_batch_size)

    def count(net: nn.Module):
        return count_correct(net.to(job.device), loader, total, device=job.device, precision=job.precision,
                             record=True)

    if job.dense_hits is None:  # once per job: every method's walk pairs against the same dense answers
        job.dense_hits = count(job.net).hits

    def evaluate(net: nn.Module) -> Evaluation:
        c = count(net)
        e = Evaluation(0.0, c.correct, c.seen, c.total)
        pair_with_dense(e, job.dense_hits, c.hits, job.search.confidence, job.search.tolerance)
        return e

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


# --- a search across methods (search.objective other than sparsity) ---------------------------------


def _walked_methods(job: PruneJob) -> tuple[list[str], dict[str, str]]:
    """(the methods to walk, {method: why not} for those skipped). Under ``latency`` a method that
    runs the dense kernels on this device cannot be the fastest model: walking it would only cost
    time (``search.walk_all=true`` walks it anyway, for the Pareto front)."""
    methods = list(job.search.methods)
    if job.search.objective != "latency" or job.search.walk_all:
        return methods, {}
    skipped = {m: "runs the dense kernels on this device: cannot be faster than the dense model"
               for m in methods if not registry.speeds_up(m, job.device.type)}
    return [m for m in methods if m not in skipped], skipped


def _measure_fn(job: PruneJob):
    """``measure(method, candidate)``: a passing candidate's figures. The same network is one
    candidate, measured (and timed) once; not across recoveries, which leave the same shapes with
    other weights."""
    example = default_example(job.net).to(job.device)
    networks: dict[str, dict] = {}

    def measure(method: str, candidate: nn.Module) -> dict:
        arch = registry.architecture_key(method, candidate) if not job.prune.iterative else None
        if arch is not None and arch in networks:
            return dict(networks[arch], timed="the same network as an earlier candidate: not timed again")
        figures = candidate_figures(method, candidate, example, job.time_pair)
        if arch is not None:
            figures["architecture"] = arch
            networks[arch] = figures
        return figures

    return measure


def _walk_fn(job: PruneJob, recovered: dict[tuple[str, float], nn.Module]):
    """Each method's walk: one-shot, or iterative keeping every passing recovered model in
    ``recovered`` (a recovered model cannot be rebuilt from a ranking, so the chosen model is
    exactly the one measured)."""
    p, s = job.prune, job.search
    if not p.iterative:
        journal_dir = job.journal_path.parent if job.journal_path else None

        def make_search(method: str) -> OneShotSearch:
            journal = journal_dir / f"journal-{s.objective}-{method}-{p.scope}.json" if journal_dir else None
            return job.oneshot(method, "contiguous", False, journal)

        return oneshot_walk(make_search, job.dm.val_set, job.device, job.dense, job.dense_hits,
                            dict(job.identity, objective=s.objective), job.loggers, job.rank_zero)
    recover, evaluate = recover_fn(job.cfg, job.dm, job.device, p, dense=job.net), _evaluate_fn(job)

    def walk(method: str, start: nn.Module, measure):
        _, result = iterative_search(start, method, s.grid, job.dense.acc, s.tolerance, recover, evaluate,
                                     job.pruner_options(), measure=measure,
                                     on_pass=lambda ratio, model: recovered.__setitem__((method, ratio), model))
        return result, 0

    return walk


def _retime_fn(job: PruneJob, recovered: dict[tuple[str, float], nn.Module]):
    """``retime(rows)``: the shortlist's models again, exactly as measured (rebuilt from the ranking,
    or the recovered model the iterative walk kept), timed together; None where latency is not timed."""
    if job.time_together is None:
        return None

    def retime(rows: list[dict]) -> dict:
        nets = {}
        for i, c in enumerate(rows):
            model = (recovered[(c["method"], c["ratio"])] if job.prune.iterative
                     else make_pruner(c["method"], copy.deepcopy(job.net), **job.pruner_options()).finish(c["ratio"]))
            nets[f"c{i}"] = (model.to(job.device, memory_format=job.memory_format), c["method"])
        return job.time_together(nets)

    return retime


def _search_across(job: PruneJob) -> PruneOutcome:
    p, s = job.prune, job.search
    t0 = time.perf_counter()
    methods, skipped = _walked_methods(job)
    recovered: dict[tuple[str, float], nn.Module] = {}
    result = search_across(job.net, methods, _walk_fn(job, recovered), s.objective, _measure_fn(job),
                           retime=_retime_fn(job, recovered), final_round=s.final_round)
    chosen = result.chosen
    search = dict(result.to_dict(), tolerance=s.tolerance, dense_val_acc=job.dense.acc,
                  threshold=pass_threshold(job.dense.acc, s.tolerance), confidence=s.confidence, scope=p.scope,
                  schedule=p.schedule, skipped_methods=skipped, best_ratio=chosen["ratio"] if chosen else 0.0,
                  best_method=chosen["method"] if chosen else None)
    if chosen is None:
        return PruneOutcome(job.net, 0.0, job.dense_val, sparsity(prunable_weights(job.net)), search, [],
                            time.perf_counter() - t0, method=p.method)
    val = (round(chosen["val_acc"] * job.dense_val[1] / 100.0), job.dense_val[1])
    if p.iterative:
        pruned = recovered[(chosen["method"], chosen["ratio"])]
        recovered.clear()
        stats = registry.stats(chosen["method"], pruned, job.net)
    else:
        pruner = make_pruner(chosen["method"], copy.deepcopy(job.net), **job.pruner_options())
        pruned = pruner.finish(chosen["ratio"])
        stats = pruner.stats()
    return PruneOutcome(pruned.to(job.device, memory_format=job.memory_format), chosen["ratio"], val, stats, search,
                        [], time.perf_counter() - t0, method=chosen["method"])


# --- one method: iterative, one-shot search, fixed ratio -----------------------------------------------


def _iterative(job: PruneJob) -> PruneOutcome:
    p, s = job.prune, job.search
    t0 = time.perf_counter()
    recover, evaluate = recover_fn(job.cfg, job.dm, job.device, p, dense=job.net), _evaluate_fn(job)
    if p.searches:
        pruned, result = iterative_search(job.net, p.method, s.grid, job.dense.acc, s.tolerance, recover, evaluate,
                                          job.pruner_options())
        ratio, search, history = result.best_ratio, search_report(result, p, "iterative"), []
    else:
        pruned, steps = iterative(job.net, p.method, schedule(float(p.ratio), p.steps), recover, evaluate,
                                  job.pruner_options())
        ratio, search, history = float(p.ratio), None, [st.to_dict() for st in steps]
    final = evaluate(pruned)
    return PruneOutcome(pruned, ratio, (final.correct, final.total), registry.stats(p.method, pruned, job.net), search,
                        history, time.perf_counter() - t0, method=p.method)


def _oneshot_search(job: PruneJob) -> PruneOutcome:
    p, s = job.prune, job.search
    t0 = time.perf_counter()
    searcher = job.oneshot(p.method, s.rule, bool(s.full_curve), job.journal_path)
    result = searcher.run(job.net, job.dm.val_set, job.device, dense=job.dense, identity=job.identity,
                          loggers=job.loggers, rank_zero=job.rank_zero, dense_hits=job.dense_hits)
    chosen = [e for e in result.curve if e.ratio == result.best_ratio]
    val = (chosen[0].correct, chosen[0].total) if chosen else job.dense_val
    return PruneOutcome(searcher.model, result.best_ratio, val, searcher.pruner.stats(),
                        search_report(result, p, "oneshot", searcher.resumed), [], time.perf_counter() - t0,
                        method=p.method)


def _fixed(job: PruneJob) -> PruneOutcome:
    p = job.prune
    t0 = time.perf_counter()
    pruner = make_pruner(p.method, job.net, **job.pruner_options())
    pruned = pruner.finish(float(p.ratio)).to(job.device)
    final = _evaluate_fn(job)(pruned)
    return PruneOutcome(pruned, float(p.ratio), (final.correct, final.total), pruner.stats(), None, [],
                        time.perf_counter() - t0, method=p.method)


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


def run_prune_stage(job: PruneJob) -> PruneOutcome:
    """The pruned network: a search across methods, the iterative schedule, the one-shot search or
    a fixed ratio, as the job's specs say. A search of a model too weak (or a split too small) to
    answer is refused unless ``search.allow_weak_model``."""
    p, s = job.prune, job.search
    problem = searchable_problem(job.dense_val, int(job.cfg.model.num_classes), float(s.tolerance)) \
        if p.searches else None
    if problem and not s.allow_weak_model:
        raise ConfigError(problem)
    if p.searches and s.across_methods:
        outcome = _search_across(job)
    elif p.iterative:
        outcome = _iterative(job)
    elif p.searches:
        outcome = _oneshot_search(job)
    else:
        outcome = _fixed(job)
    if problem:
        outcome.notes.append("search.allow_weak_model=true searched although " + problem.split("; ")[0]
                             + ": the chosen ratio means little.")
    return outcome


__all__ = ["PruneJob", "PruneOutcome", "recover_fn", "recovery_batches", "recovery_module", "run_prune_stage", "search_report"]
