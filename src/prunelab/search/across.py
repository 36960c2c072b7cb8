"""The fastest (or smallest) model within tolerance, across methods.

One one-shot walk per method (``search.methods``; chains such as ``channel+semi_structured``
too), each with its own grid, refinement and stop at its first failure, all from the same
fine-tuned weights. Every candidate that passes the accuracy test is measured (deploy-runtime
latency in turns with the dense model, bytes, MACs, nonzero parameters) through the ``measure``
callable the glue supplies; the answer is the best passing candidate under ``search.objective``
(``search.pareto.choose``), and the Pareto front of accuracy against latency is kept for the
report. Nothing passing means the dense model is the answer; under ``latency`` so does nothing
faster than the dense model beyond the noise of its own paired timing.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import Dataset

from prunelab.report.stats import wilson_interval
from prunelab.search.oneshot import OneShotSearch
from prunelab.search.pareto import choose, pareto_front
from prunelab.search.rules import Evaluation, SearchResult

log = logging.getLogger(__name__)


@dataclass
class AcrossResult:
    objective: str
    candidates: list[dict]
    chosen: dict | None  # None: nothing passed, the dense model stands
    pareto: list[dict]
    walks: dict[str, SearchResult] = field(default_factory=dict)
    resumed: int = 0

    def to_dict(self) -> dict:
        return {"objective": self.objective, "candidates": self.candidates, "pareto": self.pareto,
                "chosen": self.chosen, "methods": list(self.walks),
                # Each method's own answer to the sparsity question (its contiguous highest ratio).
                "best_ratio_by_method": {m: w.best_ratio for m, w in self.walks.items()},
                "images_evaluated": sum(w.images_evaluated for w in self.walks.values()),
                "resumed_candidates": self.resumed}


Walk = Callable[[str, nn.Module, Callable[[nn.Module], dict]], tuple[SearchResult, int]]


def candidate_row(method: str, e, threshold: float) -> dict:
    """One candidate (an ``Evaluation``, or an iterative ``Step`` judged after recovery) as the
    report lists it, figures missing where it was not measured."""
    ev = getattr(e, "after", e)
    lo, hi = wilson_interval(ev.correct, ev.total)
    row = {"method": method, "ratio": e.ratio, "val_acc": ev.acc, "val_acc_ci95": [lo, hi],
           "acc_is_bound": ev.stopped, "seen": e.seen, "passed": e.passed(threshold), "paired": ev.paired}
    for key in ("p50_ms", "p90_ms", "dense_p50_ms", "speedup", "speedup_beyond_noise", "timed", "bytes", "macs",
                "params", "channels_removed"):
        if key in ev.extra:
            row[key] = ev.extra[key]
    return row


def oneshot_walk(make_search: Callable[[str], OneShotSearch], val_set: Dataset, device: torch.device,
                 dense: Evaluation, dense_hits: torch.Tensor | None, identity: dict, loggers=(),
                 rank_zero: bool = True) -> Walk:
    """The one-shot walk of each method, its passing candidates measured."""

    def walk(method: str, net: nn.Module, measure) -> tuple[SearchResult, int]:
        searcher = make_search(method)
        searcher.measure = measure
        result = searcher.run(net, val_set, device, dense=dense, identity=dict(identity, method=method),
                              loggers=loggers, rank_zero=rank_zero, dense_hits=dense_hits)
        return result, searcher.resumed

    return walk


def search_across(net: nn.Module, methods: list[str], walk: Walk, objective: str,
                  measure: Callable[[str, nn.Module], dict]) -> AcrossResult:
    """Walk every method from a copy of ``net`` (left untouched); see the module docstring."""
    candidates: list[dict] = []
    walks: dict[str, SearchResult] = {}
    resumed = 0
    for method in methods:
        # Masking pruners work in place and the walk leaves its answer applied: keep ``net`` whole.
        result, reused = walk(method, copy.deepcopy(net), lambda candidate, method=method: measure(method, candidate))
        walks[method], resumed = result, resumed + reused
        candidates += [candidate_row(method, e, result.threshold) for e in result.curve]
        log.info("%s: best ratio %.2f within tolerance", method, result.best_ratio)
    passing = [c for c in candidates if c["passed"] and c["ratio"] > 0]
    if objective == "latency":
        # Faster only where the paired timing says so beyond its own noise: a candidate within the
        # noise of the dense model is not an answer to "the fastest model" (the dense one is).
        passing = [c for c in passing if c.get("speedup_beyond_noise")]
    chosen = choose(passing, objective)
    front = pareto_front([c for c in candidates if c["passed"]], acc=lambda c: c["val_acc"],
                         cost=lambda c: c.get("p50_ms"))
    for c in candidates:
        c["on_pareto_front"] = any(c is f for f in front)
    return AcrossResult(objective, candidates, chosen, front, walks, resumed)
