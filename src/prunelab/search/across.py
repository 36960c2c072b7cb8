"""The fastest (or smallest) model within tolerance, across methods.

One one-shot walk per method (``search.methods``; chains such as ``channel+semi_structured``
too), each with its own grid, refinement and stop at its first failure, all from the same
fine-tuned weights. Every candidate that passes the accuracy test is measured (deploy-runtime
latency in turns with the dense model, bytes, MACs, nonzero parameters) through the ``measure``
callable the glue supplies; the answer is the best passing candidate under ``search.objective``
(``search.pareto.choose``), and the Pareto front of accuracy against latency is kept for the
report. Nothing passing means the dense model is the answer; under ``latency`` so does nothing
faster than the dense model beyond the noise of its own paired timing.

Under ``latency`` each candidate was timed in its own session against its own dense timing, so a
drift in the machine between sessions can reorder close candidates. The final round
(``search.final_round``) takes the best few by their own-session screening ratio (robust to
drift) and times them all together in turns with the dense model in one session (``retime``);
the answer is the fastest of them there (or, among those within that timing's noise of the
fastest, the most accurate).

One number per model: the own-session timings are *screening* (``screening_ratio``, the dense p50
over the candidate's in that session, and ``screening_beyond_noise``) and rank the shortlist
only; a model's ``speedup`` (with ``speedup_paired_5_95`` and ``speedup_beyond_noise``) is set
only where it was measured for the record: in the final round here, or (no final round) by the
pipeline's final timing of the chosen model. Candidates whose ``measure`` figures carry the same
``architecture`` (the glue's key: the same network, e.g. channel ratios that round to the same
widths) are one candidate: the later rows name the first in ``same_as``, were not timed again and
never enter the final round.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import Dataset

from prunelab.latency import percentiles
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
    final_round: dict | None = None  # the shortlist timed together, when there was one

    def to_dict(self) -> dict:
        return {"objective": self.objective, "candidates": self.candidates, "pareto": self.pareto,
                "chosen": self.chosen, "methods": list(self.walks),
                # Each method's own answer to the sparsity question (its contiguous highest ratio).
                "best_ratio_by_method": {m: w.best_ratio for m, w in self.walks.items()},
                "images_evaluated": sum(w.images_evaluated for w in self.walks.values()),
                "resumed_candidates": self.resumed, "final_round": self.final_round}


Walk = Callable[[str, nn.Module, Callable[[nn.Module], dict]], tuple[SearchResult, int]]


def candidate_row(method: str, e, threshold: float) -> dict:
    """One candidate (an ``Evaluation``, or an iterative ``Step`` judged after recovery) as the
    report lists it, figures missing where it was not measured."""
    ev = getattr(e, "after", e)
    lo, hi = wilson_interval(ev.correct, ev.total)
    if ev.stopped:  # val_acc is then an upper bound (every unseen image counted right): the interval
        hi = max(hi, ev.acc)  # runs from what the seen images allow up to it, never excluding it
    row = {"method": method, "ratio": e.ratio, "val_acc": ev.acc, "val_acc_ci95": [lo, hi],
           "acc_is_bound": ev.stopped, "seen": e.seen, "passed": e.passed(threshold), "paired": ev.paired}
    if ev is not e:  # a recovered step: what recovery bought is only visible beside the accuracy before it
        row["val_acc_before_recovery"] = e.before.acc
    for key in ("p50_ms", "p90_ms", "dense_p50_ms", "cv", "timed", "bytes", "macs", "params", "channels_removed",
                "architecture"):
        if key in ev.extra:
            row[key] = ev.extra[key]
    # An own-session timing screens; it is not the model's speedup (see the module docstring).
    for key, name in (("speedup", "screening_ratio"), ("speedup_beyond_noise", "screening_beyond_noise")):
        if key in ev.extra:
            row[name] = ev.extra[key]
    return row


def mark_same_networks(candidates: list[dict]) -> None:
    """Later candidates with the ``architecture`` of an earlier one name it in ``same_as``."""
    first: dict = {}
    for c in candidates:
        arch = c.get("architecture")
        if arch is None:
            continue
        if arch in first:
            c["same_as"] = {"method": first[arch]["method"], "ratio": first[arch]["ratio"]}
        else:
            first[arch] = c


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


Retime = Callable[[list[dict]], dict]


def shortlist(candidates: list[dict], k: int) -> list[dict]:
    """The ``k`` candidates with the highest screening ratio over the dense model (ties: higher
    val_acc, then lower ratio, then input order). Ranked on the ratio to the dense model timed in
    the same session, not on absolute p50s from different sessions, which drift. A candidate that
    is the same network as an earlier one (``same_as``) is left out: its twin stands for it."""
    order = sorted(((i, c) for i, c in enumerate(candidates) if not c.get("same_as")),
                   key=lambda ic: (-(ic[1].get("screening_ratio") or 0.0), -(ic[1].get("val_acc") or 0.0),
                                   ic[1].get("ratio") or 0.0, ic[0]))
    return [c for _, c in order[:max(k, 0)]]


def run_final_round(passing: list[dict], k: int, retime: Retime) -> tuple[dict | None, dict]:
    """(chosen, record): the shortlist timed together by ``retime`` (which returns
    ``deploy.time_together``'s result with the candidates named ``c0``, ``c1``, ... in shortlist
    order); among those faster than dense beyond the noise of that final timing, the fastest by p50,
    unless others are not slower than it beyond their paired noise: then the most accurate of
    those (a speed difference within the noise is no reason to lose accuracy). ``before`` is what
    the own-session timings alone would have chosen."""
    first = choose([c for c in passing if c.get("screening_beyond_noise")], "latency")
    short = shortlist(passing, k)
    timed = retime(short)
    samples = timed.get("samples") or {}
    for i, c in enumerate(short):
        m = timed["models"][f"c{i}"]
        pr = m["paired_ratio"]
        c["final_round"] = {"p50_ms": m["p50"], "p90_ms": m["p90"], "speedup": m["speedup_p50"],
                            "paired_ratio_5_95": [pr["p5"], pr["p95"]], "speedup_beyond_noise": m["speedup_beyond_noise"],
                            "paired_ratio": dict(pr), "stats": {k: v for k, v in m.items() if k not in ("speedup_p50", "paired_ratio",
                                                                               "speedup_beyond_noise")}}
        # the model's one speedup: this timing, with its paired interval
        c.update(speedup=m["speedup_p50"], speedup_paired_5_95=[pr["p5"], pr["p95"]],
                 speedup_beyond_noise=m["speedup_beyond_noise"], speedup_measured_in="final round")
    beyond = [(i, c) for i, c in enumerate(short) if c["final_round"]["speedup_beyond_noise"]]
    fastest = choose([c for _, c in beyond], "latency", key=lambda c: c["final_round"]["p50_ms"])
    chosen, tied = fastest, []
    if fastest is not None:
        f = next(i for i, c in beyond if c is fastest)
        for i, c in beyond:
            if c is not fastest and f"c{i}" in samples and f"c{f}" in samples:
                # per-iteration c / fastest: its slow end (5th percentile) not above 1 means c is not
                # slower than the fastest beyond the noise of this very timing
                lo = percentiles([a / b for a, b in zip(samples[f"c{i}"], samples[f"c{f}"], strict=True)], (5,))["p5"]
                c["final_round"]["vs_fastest_p5"] = lo
                if lo <= 1.0:
                    tied.append(c)
        if tied:
            chosen = max([fastest, *tied], key=lambda c: (c["val_acc"], -c["final_round"]["p50_ms"]))
    record = {"batch_size": timed["batch_size"], "iters": timed["iters"], "runtime": timed["runtime"],
              "dense_p50_ms": timed["models"]["dense"]["p50"], "dense": timed["models"]["dense"],
              "shortlist": [{"method": c["method"], "ratio": c["ratio"],
                             **{k: v for k, v in c["final_round"].items() if k not in ("stats", "paired_ratio")}} for c in short],
              "before": {"method": first["method"], "ratio": first["ratio"]} if first else None,
              "chosen": {"method": chosen["method"], "ratio": chosen["ratio"]} if chosen else None,
              "fastest": {"method": fastest["method"], "ratio": fastest["ratio"]} if fastest else None,
              "within_noise_of_fastest": [{"method": c["method"], "ratio": c["ratio"]} for c in tied],
              "changed_choice": chosen is not first}
    return chosen, record


def search_across(net: nn.Module, methods: list[str], walk: Walk, objective: str,
                  measure: Callable[[str, nn.Module], dict], retime: Retime | None = None,
                  final_round: int = 3) -> AcrossResult:
    """Walk every method from a copy of ``net`` (left untouched); see the module docstring.
    ``retime`` and ``final_round`` (shortlist size; below 2 means no final round): latency only."""
    candidates: list[dict] = []
    walks: dict[str, SearchResult] = {}
    resumed = 0
    for method in methods:
        # Masking pruners work in place and the walk leaves its answer applied: keep ``net`` whole.
        result, reused = walk(method, copy.deepcopy(net), lambda candidate, method=method: measure(method, candidate))
        walks[method], resumed = result, resumed + reused
        candidates += [candidate_row(method, e, result.threshold) for e in result.curve]
        log.info("%s: best ratio %.2f within tolerance", method, result.best_ratio)
    mark_same_networks(candidates)
    passing = [c for c in candidates if c["passed"] and c["ratio"] > 0]
    final = None
    # Contenders for a final round: faster than dense in their own session, even within its noise
    # (the final round, timing them all together, judges the noise again); one per network.
    contenders = [c for c in passing if not c.get("same_as")
                  and (c.get("screening_beyond_noise") or (c.get("screening_ratio") or 0.0) > 1.0)]
    if objective == "latency" and retime is not None and final_round >= 2 and len(contenders) >= 2:
        chosen, final = run_final_round(contenders, final_round, retime)
        log.info("final round: %d candidates timed together; chose %s", len(final["shortlist"]), final["chosen"])
    else:
        if objective == "latency":
            # Faster only where the paired timing says so beyond its own noise: a candidate within the
            # noise of the dense model is not an answer to "the fastest model" (the dense one is).
            passing = [c for c in passing if c.get("screening_beyond_noise") and not c.get("same_as")]
        chosen = choose(passing, objective)
    front = pareto_front([c for c in candidates if c["passed"] and not c.get("same_as")], acc=lambda c: c["val_acc"],
                         cost=lambda c: c.get("p50_ms"))
    for c in candidates:
        c["on_pareto_front"] = any(c is f for f in front)
    return AcrossResult(objective, candidates, chosen, front, walks, resumed, final)
