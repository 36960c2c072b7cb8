"""``run(cfg)``: the one-way walk of a prunelab run, and nothing else.

cfg -> data + model -> fine-tune (or reuse) -> dense: val, test, latency -> prune (search or
fixed ratio) -> pruned: val, test, latency -> report (json, md, plots) -> models/*.pt
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning import Trainer
from omegaconf import DictConfig, OmegaConf
from torch import nn

from prunelab import config_check
from prunelab.deploy.auto import pick
from prunelab.deploy.ship import save_pruned
from prunelab.deploy.timing import time_dense_and_pruned, time_together
from prunelab.errors import ConfigError
from prunelab.evaluation import Count, count_correct, shard_loader
from prunelab.finetune import finetune
from prunelab.io import link_or_copy, save_state_dict, state_digest, write_json, write_text
from prunelab.latency import latency_batches
from prunelab.prune_stage import run_prune_stage
from prunelab.pruning import registry
from prunelab.pruning.masks import prunable_weights, sparsity
from prunelab.pruning.spec import prune_spec
from prunelab.report import markdown, plots
from prunelab.report.schema import device_info, model_section
from prunelab.report.stats import NOISY_CV, drop_within_noise, speed_verdict
from prunelab.resolve import resolve_run
from prunelab.trainer import build, build_trainer

log = logging.getLogger("prunelab")


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


def _count(model, dataset, batch_size, device, precision, record: bool = False) -> Count:
    loader, total = shard_loader(dataset, batch_size)
    return count_correct(model, loader, total, device=device, precision=precision, record=record)


def _agreement_images(dataset, images: int) -> list[torch.Tensor] | None:
    """The first ``images`` validation images, what the deploy forms' answers are checked on
    (``deploy`` regroups them into the timed batch size); None for 0: the headline timing batch."""
    n = min(int(images), len(dataset))
    return [torch.stack([dataset[i][0] for i in range(n)])] if n > 0 else None


def _layout(spec, channels_last: bool) -> bool | None:
    """The layout latency is timed in: served runtimes use the spec's deploy layout (None); eager
    times the model as trained, in the layout it was trained in."""
    return channels_last if spec.runtime == "eager" else None


def _timer(spec, batches, device, loggers, precision: str, channels_last: bool, check_batches=None, ship_to=None):
    """``time(dense, pruned, method, sizes=None) -> dict``: dense and pruned in turns in the run's
    latency runtime (``deploy.time_dense_and_pruned``); None where latency is not timed. The
    logged (final) timings first check the served forms' answers on ``check_batches`` and write
    the timed model in its runtime's format into ``ship_to``."""
    if batches is None:
        return None
    layout = _layout(spec, channels_last)

    def time(dense: nn.Module, pruned: nn.Module | None, method: str | None, sizes=None, log=True,
             head: int | None = None) -> dict:
        # ``head``: the batch size that leads this timing when ``sizes`` leave the headline one out
        # (it was measured elsewhere: a latency search's final round).
        chosen = batches if sizes is None else {b: batches[b] for b in sizes}
        spec_here = spec if head is None else dataclasses.replace(spec, batch_size=head)
        return time_dense_and_pruned(dense, pruned, method, chosen, device, spec_here,
                                     loggers if log and head is None else (),
                                     precision=precision, channels_last=layout, check=log,
                                     agreement_batches=check_batches, ship_to=ship_to if log else None)

    return time


def _together_timer(dense: nn.Module | None, spec, batches, device, precision: str, channels_last: bool):
    """Times a latency search's shortlist all in turns with the dense model, at the headline batch
    size, in the run's latency runtime (``deploy.time_together``); None where latency is not timed."""
    if batches is None or dense is None:
        return None
    layout = _layout(spec, channels_last)
    head = batches[spec.batch_size]

    def together(candidates: dict) -> dict:
        return time_together(dense, candidates, head, device, spec, precision=precision, channels_last=layout)

    return together


def _pair_timer(dense: nn.Module | None, timer, head: int, device: torch.device):
    """Times a search candidate in turns with the dense model at the headline batch size. A
    candidate that runs the dense kernels here (unstructured zeros; 2:4 off CUDA) is not timed:
    it is as fast as the dense model, and timing it would only let noise rank it."""
    if timer is None or dense is None:
        return None
    dense_alone: dict = {}

    def time_pair(candidate: nn.Module, method: str) -> dict:
        if not registry.speeds_up(method, device.type):
            if not dense_alone:
                dense_alone.update(timer(dense, None, None, sizes=[head], log=False)["dense"])
            p50 = dense_alone["p50"]
            return {"p50_ms": p50, "p90_ms": dense_alone["p90"], "dense_p50_ms": p50, "speedup": 1.0,
                    "speedup_beyond_noise": False, "timed": "as dense (same kernels here)"}
        r = timer(dense, candidate, method, sizes=[head], log=False)
        return {"p50_ms": r["pruned"]["p50"], "p90_ms": r["pruned"]["p90"], "dense_p50_ms": r["dense"]["p50"],
                "cv": max(r["pruned"]["cv"], r["dense"]["cv"]),
                "speedup": r["speedup_p50"], "speedup_beyond_noise": bool(r["speedup_beyond_noise"]),
                "timed": "in turns with dense"}

    return time_pair


def _measured_in_final_round(search: dict | None) -> dict | None:
    """The chosen candidate of a latency search when the final round timed it: its speedup there is
    the one the report quotes."""
    chosen = (search or {}).get("chosen")
    return chosen if chosen and chosen.get("final_round") and (search or {}).get("final_round") else None


def _final_timing(timer, dense: nn.Module, pruned: nn.Module | None, family: str, search: dict | None,
                  head: int, sizes: list[int], loggers) -> dict:
    """Dense and pruned in turns at every batch size, except where a latency search's final round
    already timed the chosen model in turns with the dense model: then the headline batch size's
    figures are the final round's (one number per model) and only the other sizes are timed here
    (with the deploy forms' answers checked); with no other size, all are timed and the headline
    size's figures replaced."""
    chosen = _measured_in_final_round(search) if pruned is not None else None
    if chosen is None:
        return timer(dense, pruned, family)
    rest = [b for b in sizes if b != head]
    # (``head`` given: timed with the answers checked, nothing logged; the final round's figures are)
    lat = timer(dense, pruned, family, sizes=rest or None, head=max(rest) if rest else head)
    fr, final = chosen["final_round"], search["final_round"]
    d, q = dict(final["dense"]), dict(fr["stats"])
    pr = dict(fr["paired_ratio"])
    lat = dict(lat, batch_size=head, dense=d, pruned=q, speedup_p50=fr["speedup"], speedup_paired_5_95=[pr["p5"], pr["p95"]],
               speedup_beyond_noise=fr["speedup_beyond_noise"], measured_in="final round of the search")
    by = dict(lat["by_batch_size"], **{str(head): {"dense": d, "pruned": q, "speedup_p50": fr["speedup"], "paired_ratio": pr}})
    lat["by_batch_size"] = {str(b): by[str(b)] for b in sorted(sizes)}
    for lg in loggers:
        lg.log_metrics({**{f"latency/{tag}/{k}_ms": st[k] for tag, st in (("dense", d), ("pruned", q))
                           for k in ("p50", "p90", "p99")}, "latency/speedup_p50": fr["speedup"]}, step=0)
    return lat


def _headline_speed(report: dict, pruned: dict, method: str, device: torch.device) -> None:
    """The pruned model's one speedup (value, paired interval, verdict), where its method can run
    faster than the dense model here; where it runs the dense kernels, the ratio stays only as the
    timing's noise, never as a speedup. Also the timing's coefficient of variation."""
    lat = report["latency"]
    if registry.speeds_up(method, device.type):
        pruned["speedup_p50"] = lat["speedup_p50"]
        pruned["speedup"] = {"value": lat["speedup_p50"], "paired_5_95": lat["speedup_paired_5_95"],
                             "verdict": speed_verdict(lat["speedup_paired_5_95"]),
                             "measured_in": lat.get("measured_in", "final timing")}
        chosen = (report.get("search") or {}).get("chosen")
        if chosen is not None and "speedup" not in chosen:  # no final round: this timing is its number
            chosen.update(speedup=lat["speedup_p50"], speedup_paired_5_95=lat["speedup_paired_5_95"],
                          speedup_beyond_noise=lat["speedup_beyond_noise"], speedup_measured_in="final timing")
    else:
        ratio = lat.pop("speedup_p50")
        interval = lat.pop("speedup_paired_5_95")
        lat.pop("speedup_beyond_noise", None)
        lat.setdefault("noise", {"ratio_of_p50s": ratio, "paired_ratio_5_95": interval,
                                 "within_noise": interval[0] <= 1.0 <= interval[1]})


def _timing_spread(lat: dict, dense: dict | None, pruned: dict | None) -> None:
    """The coefficient of variation of each model's timings at the headline batch size, and a note
    where it is above ``NOISY_CV``."""
    cv = {tag: st["cv"] for tag, st in (("dense", dense), ("pruned", pruned)) if st and "cv" in st}
    if not cv:
        return
    lat["cv"] = cv
    lat["noisy"] = max(cv.values()) > NOISY_CV
    if lat["noisy"]:
        lat.setdefault("notes", []).append(
            "Timings varied more than the report can stand behind (coefficient of variation "
            + ", ".join(f"{t} {v:.0%}" for t, v in cv.items()) + f", above {NOISY_CV:.0%}): the machine was busy; "
            "the paired interval allows for drift, but rerun on an idle machine before quoting these figures.")


def _check_classes(dm, model: DictConfig) -> None:
    """The head must have one output per class the data hold (class folders set their own count)."""
    n = getattr(dm, "num_classes", None)
    if n is not None and model.get("num_classes") is not None and n != model.num_classes:
        raise ConfigError(f"the data hold {n} classes but model.num_classes={model.num_classes}; "
                          f"set model.num_classes={n}")


def run(cfg: DictConfig) -> dict:
    config_check.check(cfg)
    resolved, spec = resolve_run(cfg)  # before anything is built: every hardware "auto" becomes a concrete value
    timing: dict[str, float | None] = {"finetune": None, "search": None, "latency": None}
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    out = Path(cfg.paths.output_dir)

    dm = build(cfg.data, "data")
    dm.prepare_data()  # fails fast, before any work, when the data is missing and offline
    module = build(cfg.model, "model")
    dm.setup("fit")
    _check_classes(dm, cfg.model)
    trainer = build_trainer(cfg)

    ft = finetune(cfg, trainer, module, dm)
    timing["finetune"] = ft.seconds
    ensure_distributed(trainer)
    rank_zero = trainer.is_global_zero
    device = trainer.strategy.root_device
    net = module.net.to(device)
    precision = str(cfg.trainer.precision)
    dense_stored = None
    if rank_zero:
        if ft.cached:  # the cache file holds exactly these weights: one file under two names where it can
            dense_stored = link_or_copy(ft.cached, out / "models" / "dense.pt")
        else:
            save_state_dict(out / "models" / "dense.pt", net.state_dict())

    eval_bs = dm.eval_batch_size
    params = sum(p.numel() for p in net.parameters())
    # Latency is timed on rank zero alone: concurrent ranks would share (and skew) the device.
    batches = latency_batches(dm.test_set, spec.batch_sizes) if cfg.stages.latency and rank_zero else None
    memory_format = module.memory_format
    check_batches = _agreement_images(dm.val_set, spec.agreement_images) if batches is not None else None
    runtime_choice = None
    if batches is not None and spec.runtime == "auto":  # the fastest runtime for the dense model, measured here
        spec, runtime_choice = pick(net, batches[spec.batch_size], spec, device,
                                    torch.cat(check_batches) if check_batches else None)
    timer = _timer(spec, batches, device, trainer.loggers, precision, bool(cfg.model.channels_last), check_batches,
                   out / "models")

    # Per-image correctness too: candidates are compared with the dense model on the same images.
    dense_count = _count(net, dm.val_set, eval_bs, device, precision, record=True)
    dense_val = (dense_count.correct, dense_count.total)
    c = _count(net, dm.test_set, eval_bs, device, precision)
    dense_test = (c.correct, c.total)
    t0 = time.perf_counter()
    # With a prune stage the dense model is timed in turns with the pruned one, below.
    alone = timer(net, None, None) if timer is not None and not cfg.stages.prune else None
    timing["latency"] = time.perf_counter() - t0
    barrier()
    dense = model_section(dense_val, dense_test, params, sparsity(prunable_weights(net)), alone and alone["dense"])
    for lg in trainer.loggers:
        lg.log_metrics({"dense/val_acc": dense["val_acc"]["value"], "dense/test_acc": dense["test_acc"]["value"]}, step=0)

    report: dict = {"dense": dense}
    if alone is not None:
        report["latency"] = {k: v for k, v in alone.items() if k not in ("dense", "pruned")}
        _timing_spread(report["latency"], alone["dense"], None)
    if runtime_choice is not None:
        report["runtime_choice"] = runtime_choice
    files = {"dense_bytes": (out / "models" / "dense.pt").stat().st_size} if rank_zero else {}
    if dense_stored == "link":
        files["dense_linked_to"] = ft.cached  # a hard link: no second copy on disk
    if cfg.stages.prune:
        p = prune_spec(cfg)
        # The dense network as timed against every candidate and the chosen model: a copy, since
        # masking methods prune ``net`` in place (rank zero only, and only when timing).
        dense_timed = copy.deepcopy(net) if timer is not None else None
        digest = state_digest(net.state_dict())
        # One journal per exact set of weights: another model never resumes (or overwrites) it.
        journal = Path(cfg.finetune.cache_dir) / "journals" / digest / f"journal-{p.method}-{p.scope}.json"
        outcome = run_prune_stage(cfg, net, dm, device, precision, dense_val,
                                  journal if cfg.finetune.cache and rank_zero else None,
                                  # Journal entries are reused only for these exact weights and this split.
                                  {"weights": digest, "val_images": dense_val[1],
                                   "val_correct": dense_val[0], "method": p.method},
                                  memory_format, trainer.loggers, rank_zero,
                                  dense_hits=dense_count.hits, time_pair=_pair_timer(dense_timed, timer, spec.batch_size, device),
                                  time_together=_together_timer(dense_timed, spec, batches, device, precision,
                                                                bool(cfg.model.channels_last)))
        method = outcome.method
        timing["search"] = outcome.seconds
        pruned_net = outcome.net.to(device, memory_format=memory_format)
        c = _count(pruned_net, dm.test_set, eval_bs, device, precision)
        pruned_test = (c.correct, c.total)
        t0 = time.perf_counter()
        pruned_lat = kernel_note = None
        # Nothing within the tolerance (or a ratio of 0): the "pruned" model is the dense one, so
        # it is not timed against itself (the same model's two timings differ only by noise).
        kept_dense = outcome.ratio == 0
        if timer is not None:
            # Always in turns, same runtime, dtype and layout: a change in machine load hits both alike.
            lat = _final_timing(timer, dense_timed, None if kept_dense else pruned_net, method,
                                outcome.search, spec.batch_size, sorted(batches), trainer.loggers)
            dense["latency_ms"], pruned_lat, kernel_note = lat["dense"], lat.get("pruned"), lat.get("kernels")
            report["latency"] = {k: v for k, v in lat.items() if k not in ("dense", "pruned")}
            _timing_spread(report["latency"], lat["dense"], pruned_lat)
            del dense_timed
        timing["latency"] += time.perf_counter() - t0
        barrier()
        stats = outcome.stats
        pruned = model_section(outcome.val, pruned_test, sum(q.numel() for q in pruned_net.parameters()),
                               registry.counted_weights(method, pruned_net, stats),
                               pruned_lat)
        pruned.update(ratio=outcome.ratio, method=method, scope=p.scope, schedule=p.schedule,
                      layers=stats["layers"], sparsity=stats["sparsity"], nonzero=stats["nonzero"])
        if stats.get("shortfall"):  # the ratio asked for was not reached: say what was, and why
            pruned["ratio_reached"] = stats["sparsity"]
            outcome.notes.append(f"{method} at ratio {outcome.ratio:.2f} zeroed {stats['sparsity']:.3f} of the "
                                 f"weights: {stats['shortfall']}.")
            report["prune_notes"] = outcome.notes
        if stats.get("head_rows_kept"):  # the floor that keeps every class scored from the input
            outcome.notes.append(f"{method} at ratio {outcome.ratio:.2f} would have zeroed every weight of "
                                 f"{stats['head_rows_kept']} class row(s) of the head: each keeps its largest weight.")
        for key in ("macs", "dense_macs", "channels", "channels_removed", "two_four_layers", "head_rows_kept"):
            if key in stats:
                pruned[key] = stats[key]
        if kernel_note:
            pruned["kernels"] = kernel_note
        if outcome.search is not None:
            report["search"] = outcome.search
        if outcome.notes:
            report["prune_notes"] = outcome.notes
        if pruned_lat:
            _headline_speed(report, pruned, method, device)
        if outcome.schedule:
            report["schedule"] = outcome.schedule
        report["pruned"] = pruned
        if rank_zero:
            files.update(save_pruned(method, pruned_net,
                                     out / "models", cfg.model.arch, cfg.model.num_classes))
    report["files"] = files
    report["finetune"] = ft.to_dict()
    report["timing_s"] = timing
    report["device"] = device_info(device)
    report["resolved"] = resolved
    report["notes"] = _notes(report, cfg)
    report["config"] = OmegaConf.to_container(cfg, resolve=True)
    if rank_zero:
        _write_outputs(report, out)
    return report


def _notes(report: dict, cfg: DictConfig) -> list[str]:
    notes = list(report.get("prune_notes") or [])
    p = report.get("pruned")
    drop = report["dense"]["val_acc"]["value"] - p["val_acc"]["value"] if p else 0.0
    if p and p["ratio"] == 0:
        notes.append("Nothing was pruned: no candidate stayed within the tolerance, so the dense model stands; "
                     "the pruned column repeats it, and it is not timed against itself.")
        p = None
    elif p and drop <= 0:
        notes.append(f"The pruned model scores {abs(drop):.2f} points at or above the dense model on validation.")
    elif p and drop_within_noise(report["dense"]["val_acc"], p["val_acc"]):
        notes.append(
            f"The validation accuracy drop ({report['dense']['val_acc']['value'] - p['val_acc']['value']:.2f} points) "
            "is smaller than the noise of the validation set (half its 95% interval): "
            "dense and pruned are not distinguishable on this data."
        )
    if p and registry.dense_kernels(p.get("method")) and p["ratio"] > 0:
        notes.append("Unstructured zeros run on dense kernels: expect no speedup from them, only smaller compressed files.")
    lat_notes = (report.get("latency") or {}).get("notes") or []
    if p and p.get("kernels") and p["kernels"] not in lat_notes:
        notes.append(p["kernels"])
    notes += lat_notes
    if report["device"]["type"] == "cpu":
        notes.append("Latency measured on the CPU; GPU figures need a run with trainer.accelerator=gpu.")
    return notes


def _write_outputs(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    try:
        figs = plots.write_all(report, out)
    except Exception as exc:  # a plot must never cost the results
        log.warning("plots failed: %s", exc)
        figs = {}
    write_json(out / "report.json", report)
    write_text(out / "report.md", markdown.render(report, figs))
    print("\n" + markdown.summary_table(report) + f"\n\nReport: {out / 'report.md'}\n", flush=True)
