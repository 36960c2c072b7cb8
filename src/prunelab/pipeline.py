"""``run(cfg)``: the one-way walk of a prunelab run, as stages over one :class:`RunContext`.

start (check, resolve, build) -> fine-tune (or reuse) -> dense (val, test, latency) -> prune
(search or fixed ratio) -> test (the pruned model) -> time (dense and pruned in turns) -> report
(json, md, plots; models/*.pt). Each stage reads and fills the context; none decides anything about
a pruning method by its name (``pruning.registry`` does).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning import Trainer
from omegaconf import DictConfig, OmegaConf
from torch import nn

from prunelab import config_check
from prunelab.deploy.session import TimingSession, open_session
from prunelab.deploy.ship import save_pruned
from prunelab.deploy.spec import DeploySpec
from prunelab.errors import ConfigError
from prunelab.evaluation import Count, count_correct, shard_loader
from prunelab.finetune import finetune
from prunelab.io import link_or_copy, save_state_dict, state_digest
from prunelab.prune_stage import PruneJob, PruneOutcome, run_prune_stage
from prunelab.pruning import registry
from prunelab.pruning.masks import prunable_weights, sparsity
from prunelab.pruning.spec import PruneSpec, prune_spec
from prunelab.report import sections
from prunelab.report.schema import device_info, model_section
from prunelab.resolve import resolve_run
from prunelab.search.spec import SearchSpec, search_spec
from prunelab.trainer import build, build_trainer

# The pruned model's figures the report copies from its method's statistics, where present.
STAT_KEYS = ("macs", "dense_macs", "channels", "channels_removed", "two_four_layers", "head_rows_kept")


@dataclass
class RunContext:
    """What the stages of one run share: the settings, the built objects, and what each stage found."""

    cfg: DictConfig
    prune: PruneSpec
    search: SearchSpec
    spec: DeploySpec  # latency.* resolved for this machine (auto's runtime decided by the dense stage)
    resolved: dict  # every hardware ``auto`` and why, for the report
    out: Path
    dm: Any
    module: Any
    trainer: Trainer
    timing: dict[str, float | None] = field(default_factory=lambda: {"finetune": None, "search": None, "latency": None})
    report: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)
    ft: Any = None  # the fine-tune's result (trained or reused)
    net: nn.Module | None = None
    device: torch.device | None = None
    rank_zero: bool = True
    session: TimingSession | None = None  # None: latency is not timed (stage off, or not rank zero)
    dense_count: Count | None = None

    @property
    def precision(self) -> str:
        return str(self.cfg.trainer.precision)

    @property
    def dense_val(self) -> tuple[int, int]:
        return self.dense_count.correct, self.dense_count.total

    def count(self, net: nn.Module, dataset, record: bool = False) -> Count:
        loader, total = shard_loader(dataset, self.dm.eval_batch_size)
        return count_correct(net, loader, total, device=self.device, precision=self.precision, record=record)


def ensure_distributed(trainer: Trainer) -> None:
    """Start the DDP workers and process group when no fit did (a reused fine-tune), so the
    search runs on every rank with its counts summed across them."""
    if trainer.world_size <= 1 or (dist.is_available() and dist.is_initialized()):
        return
    launcher = trainer.strategy.launcher
    if launcher is not None:
        launcher.launch(trainer.strategy.setup_environment, trainer=trainer)
    else:
        trainer.strategy.setup_environment()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _check_classes(dm, model: DictConfig) -> None:
    """The head must have one output per class the data hold (class folders set their own count)."""
    n = getattr(dm, "num_classes", None)
    if n is not None and model.get("num_classes") is not None and n != model.num_classes:
        raise ConfigError(f"the data hold {n} classes but model.num_classes={model.num_classes}; "
                          f"set model.num_classes={n}")


def start(cfg: DictConfig) -> RunContext:
    """Check every value, resolve every hardware ``auto``, then build the data, model and trainer."""
    config_check.check(cfg)
    resolved, spec = resolve_run(cfg)  # before anything is built: every hardware "auto" becomes a concrete value
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = build(cfg.data, "data")
    dm.prepare_data()  # fails fast, before any work, when the data is missing and offline
    module = build(cfg.model, "model")
    dm.setup("fit")
    _check_classes(dm, cfg.model)
    return RunContext(cfg, prune_spec(cfg), search_spec(cfg), spec, resolved, Path(cfg.paths.output_dir), dm, module,
                      build_trainer(cfg))


def finetune_stage(ctx: RunContext) -> None:
    """Train (or reuse a cached fine-tune); the dense weights go to models/dense.pt."""
    ctx.ft = finetune(ctx.cfg, ctx.trainer, ctx.module, ctx.dm)
    ctx.timing["finetune"] = ctx.ft.seconds
    ensure_distributed(ctx.trainer)
    ctx.rank_zero, ctx.device = ctx.trainer.is_global_zero, ctx.trainer.strategy.root_device
    ctx.net = ctx.module.net.to(ctx.device)
    if not ctx.rank_zero:
        return
    dense_path = ctx.out / "models" / "dense.pt"
    if ctx.ft.cached:  # the cache file holds exactly these weights: one file under two names where it can
        if link_or_copy(ctx.ft.cached, dense_path) == "link":
            ctx.files["dense_linked_to"] = ctx.ft.cached  # a hard link: no second copy on disk
    else:
        save_state_dict(dense_path, ctx.net.state_dict())
    ctx.files = {"dense_bytes": dense_path.stat().st_size, **ctx.files}


def dense_stage(ctx: RunContext) -> None:
    """The dense model on val (per image: candidates are compared on the same images) and test; with
    latency, the run's runtime decided (``auto``) and, without a prune stage, the dense model timed."""
    cfg, net = ctx.cfg, ctx.net
    if cfg.stages.latency and ctx.rank_zero:  # timed on rank zero alone: concurrent ranks would skew it
        ctx.session = open_session(ctx.spec, net, ctx.dm.test_set, ctx.dm.val_set, ctx.device, ctx.precision,
                                   bool(cfg.model.channels_last), ctx.trainer.loggers, ctx.out / "models")
        ctx.spec = ctx.session.spec
    ctx.dense_count = ctx.count(net, ctx.dm.val_set, record=True)
    c = ctx.count(net, ctx.dm.test_set)
    t0 = time.perf_counter()
    # With a prune stage the dense model is timed in turns with the pruned one, in the time stage.
    alone = ctx.session.time(net, None, None) if ctx.session is not None and not cfg.stages.prune else None
    ctx.timing["latency"] = time.perf_counter() - t0
    barrier()
    dense = model_section(ctx.dense_val, (c.correct, c.total), sum(p.numel() for p in net.parameters()),
                          sparsity(prunable_weights(net)), alone and alone["dense"])
    for lg in ctx.trainer.loggers:
        lg.log_metrics({"dense/val_acc": dense["val_acc"]["value"], "dense/test_acc": dense["test_acc"]["value"]}, step=0)
    ctx.report["dense"] = dense
    if alone is not None:
        ctx.report["latency"] = {k: v for k, v in alone.items() if k not in ("dense", "pruned")}
        sections.timing_spread(ctx.report["latency"], alone["dense"], None)
    if ctx.session is not None and ctx.session.runtime_choice is not None:
        ctx.report["runtime_choice"] = ctx.session.runtime_choice


def prune_stage(ctx: RunContext, dense_timed: nn.Module | None) -> PruneOutcome:
    """Search or prune at the fixed ratio (``prune_stage.run_prune_stage``), candidates timed
    against ``dense_timed`` where latency is timed."""
    p, net = ctx.prune, ctx.net
    digest = state_digest(net.state_dict())
    # One journal per exact set of weights: another model never resumes (or overwrites) it.
    journal = Path(ctx.cfg.finetune.cache_dir) / "journals" / digest / f"journal-{p.method}-{p.scope}.json"
    session = ctx.session if dense_timed is not None else None
    job = PruneJob(ctx.cfg, p, ctx.search, net, ctx.dm, ctx.device, ctx.precision, ctx.dense_val,
                   journal if ctx.cfg.finetune.cache and ctx.rank_zero else None,
                   # Journal entries are reused only for these exact weights and this split.
                   {"weights": digest, "val_images": ctx.dense_val[1], "val_correct": ctx.dense_val[0],
                    "method": p.method},
                   ctx.module.memory_format, ctx.trainer.loggers, ctx.rank_zero, ctx.dense_count.hits,
                   time_pair=(lambda candidate, method: session.screen(dense_timed, candidate, method)) if session else None,
                   time_together=(lambda nets: session.together(dense_timed, nets)) if session else None)
    outcome = run_prune_stage(job)
    ctx.timing["search"] = outcome.seconds
    outcome.net = outcome.net.to(ctx.device, memory_format=ctx.module.memory_format)
    return outcome


def test_stage(ctx: RunContext, outcome: PruneOutcome) -> tuple[int, int]:
    """The chosen model on the test split, once."""
    c = ctx.count(outcome.net, ctx.dm.test_set)
    return c.correct, c.total


def time_stage(ctx: RunContext, outcome: PruneOutcome, dense_timed: nn.Module | None) -> dict | None:
    """Dense and pruned in turns, same runtime, dtype and layout (a change in machine load hits
    both alike); None where latency is not timed. Nothing within the tolerance (or a ratio of 0):
    the "pruned" model is the dense one, and is not timed against itself."""
    t0 = time.perf_counter()
    lat = None
    if ctx.session is not None:
        kept_dense = outcome.ratio == 0
        lat = ctx.session.final(dense_timed, None if kept_dense else outcome.net, outcome.method, outcome.search)
        ctx.report["dense"]["latency_ms"] = lat["dense"]
        ctx.report["latency"] = {k: v for k, v in lat.items() if k not in ("dense", "pruned")}
        sections.timing_spread(ctx.report["latency"], lat["dense"], lat.get("pruned"))
    ctx.timing["latency"] += time.perf_counter() - t0
    return lat


def pruned_section(ctx: RunContext, outcome: PruneOutcome, test: tuple[int, int], lat: dict | None) -> None:
    """The report's ``pruned`` section (with the search, the schedule and the notes of the stage),
    and the pruned model written in its method's compact form."""
    method, stats, report = outcome.method, outcome.stats, ctx.report
    pruned = model_section(outcome.val, test, sum(q.numel() for q in outcome.net.parameters()),
                           registry.counted_weights(method, outcome.net, stats), lat and lat.get("pruned"))
    pruned.update(ratio=outcome.ratio, method=method, scope=ctx.prune.scope, schedule=ctx.prune.schedule,
                  layers=stats["layers"], sparsity=stats["sparsity"], nonzero=stats["nonzero"])
    if stats.get("shortfall"):  # the ratio asked for was not reached: say what was, and why
        pruned["ratio_reached"] = stats["sparsity"]
        outcome.notes.append(f"{method} at ratio {outcome.ratio:.2f} zeroed {stats['sparsity']:.3f} of the "
                             f"weights: {stats['shortfall']}.")
    if stats.get("head_rows_kept"):  # the floor that keeps every class scored from the input
        outcome.notes.append(f"{method} at ratio {outcome.ratio:.2f} would have zeroed every weight of "
                             f"{stats['head_rows_kept']} class row(s) of the head: each keeps its largest weight.")
    pruned.update({k: stats[k] for k in STAT_KEYS if k in stats})
    if lat and lat.get("kernels"):
        pruned["kernels"] = lat["kernels"]
    for key, value in (("search", outcome.search), ("prune_notes", outcome.notes), ("schedule", outcome.schedule)):
        if value:
            report[key] = value
    if lat and lat.get("pruned"):
        sections.headline_speed(report, pruned, registry.speeds_up(method, ctx.device.type))
    report["pruned"] = pruned
    if ctx.rank_zero:
        ctx.files.update(save_pruned(method, outcome.net, ctx.out / "models", ctx.cfg.model.arch,
                                     ctx.cfg.model.num_classes))


def report_stage(ctx: RunContext) -> dict:
    """The run's report, complete; written (json, md, plots) on rank zero."""
    report = ctx.report
    report["files"] = ctx.files
    report["finetune"] = ctx.ft.to_dict()
    report["timing_s"] = ctx.timing
    report["device"] = device_info(ctx.device)
    report["resolved"] = ctx.resolved
    report["notes"] = sections.notes(report, registry.dense_kernels((report.get("pruned") or {}).get("method")))
    report["config"] = OmegaConf.to_container(ctx.cfg, resolve=True)
    if ctx.rank_zero:
        sections.write_outputs(report, ctx.out)
    return report


def run(cfg: DictConfig) -> dict:
    """One run, end to end; returns the report (written under ``paths.output_dir`` on rank zero)."""
    ctx = start(cfg)
    finetune_stage(ctx)
    dense_stage(ctx)
    if cfg.stages.prune:
        # The dense network as timed against every candidate and the chosen model: a copy, since
        # masking methods prune ``net`` in place (rank zero only, and only when timing).
        dense_timed = copy.deepcopy(ctx.net) if ctx.session is not None else None
        outcome = prune_stage(ctx, dense_timed)
        test = test_stage(ctx, outcome)
        lat = time_stage(ctx, outcome, dense_timed)
        del dense_timed
        barrier()
        pruned_section(ctx, outcome, test, lat)
    return report_stage(ctx)
