"""Pruning schedules with recovery: prune in steps and fine-tune between them.

``iterative`` prunes towards a target in ``steps`` increments, fine-tuning ``recover_epochs``
after each (``recover`` is told which step it recovers: each step may have its own budget), with the
pruned weights held at zero (``MaskKeeper``) or, for a method that builds a smaller network (channel
pruning), that network trained as it is. ``iterative_search`` walks a
ratio grid upwards from the dense model, each step starting from the previous step's recovered
weights, until a recovered model falls out of the tolerance. Both take the training and evaluation
as callables, so the schedule logic does not depend on Lightning.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from torch import nn

from prunelab.pruning import registry
from prunelab.pruning.registry import candidate_extra, make_pruner
from prunelab.search.rules import RULES, Evaluation, SearchResult, pass_threshold, pick, verdict

log = logging.getLogger(__name__)

Recover = Callable[[nn.Module, dict | None, int], nn.Module]  # (pruned net, masks to keep, step index)
Evaluate = Callable[[nn.Module], Evaluation]


@dataclass
class Step:
    ratio: float
    before: Evaluation  # right after pruning this step
    after: Evaluation  # after recovery
    extra: dict = field(default_factory=dict)

    @property
    def seen(self) -> int:
        """Images evaluated for this step: once right after pruning, once after recovery."""
        return self.before.seen + self.after.seen

    def passed(self, threshold: float) -> bool:
        return verdict(self.after, threshold)

    def to_dict(self, threshold: float | None = None) -> dict:
        d = self.after.to_dict()
        d.update(ratio=self.ratio, val_acc=self.before.acc, acc_is_bound=False,
                 recovered_val_acc=self.after.acc, correct=self.after.correct, seen=self.before.seen)
        d.update(self.extra)
        if threshold is not None:
            d["passed"] = verdict(self.after, threshold)
            d["passed_before_recovery"] = verdict(self.before, threshold)
        return d


def prune_step(method: str, net: nn.Module, target: float, start, options: dict):
    """Prune ``net`` towards the total ``target`` (a copy for a method that prunes in place); returns
    the pruned network, the masks to keep during recovery, and its stats. A method with a step rule
    (``registry.steps``: channel pruning) is asked for what is still missing of ``target`` against
    ``start`` (what the rule recorded before the first step); the others rank the current weights,
    zeros first, so the target applies directly."""
    if registry.in_place(method):  # keep the caller's network intact
        net = copy.deepcopy(net)
    rule = registry.steps(method, options)
    pruner = make_pruner(method, net, **options, **(rule.options(net, target, start) if rule else {}))
    pruned = pruner.finish(rule.ratio(net, target, start) if rule else target)
    stats = pruner.stats()
    if rule:
        stats = rule.stats(pruned, stats, start)
    return pruned, pruner.keep_masks(), stats


def iterative(net: nn.Module, method: str, targets: Iterable[float], recover: Recover, evaluate: Evaluate,
              options: dict, stop: Callable[[Step], bool] | None = None,
              on_step: Callable[[Step, nn.Module], None] | None = None) -> tuple[nn.Module, list[Step]]:
    """Prune to each target in turn, recovering after each; stop early when ``stop(step)``.
    ``on_step(step, recovered_net)`` sees every step (e.g. to measure the recovered model).

    Returns the network of the last step that did not stop the walk, and every step taken.
    """
    rule = registry.steps(method, options)
    start = rule.start(net) if rule else None
    steps: list[Step] = []
    kept = net
    for i, target in enumerate(targets):
        target = round(float(target), 6)
        pruned, masks, stats = prune_step(method, kept, target, start, options)
        before = evaluate(pruned)
        recovered = recover(pruned, masks, i)
        after = evaluate(recovered)
        after.nonzero = before.nonzero = stats["nonzero"]
        step = Step(target, before, after, candidate_extra(method, stats))
        steps.append(step)
        log.info("ratio %.2f: val acc %.2f%% after pruning, %.2f%% after recovery", target, before.acc, after.acc)
        if on_step is not None:
            on_step(step, recovered)
        if stop is not None and stop(step):
            break
        kept = recovered
    return kept, steps


def schedule(target: float, steps: int) -> list[float]:
    """``steps`` equal increments up to ``target``."""
    if steps < 1:
        raise ValueError(f"prune.steps must be >= 1, got {steps}")
    return [round(target * (i + 1) / steps, 6) for i in range(steps)]


def iterative_search(net: nn.Module, method: str, grid: Iterable[float], dense_acc: float, tolerance: float,
                     recover: Recover, evaluate: Evaluate, options: dict,
                     measure: Callable[[nn.Module], dict] | None = None,
                     on_pass: Callable[[float, nn.Module], None] | None = None) -> tuple[nn.Module, SearchResult]:
    """Walk the grid upwards with recovery; the answer is the highest ratio whose recovered
    accuracy passes, reached without any failure below it (the contiguous rule). ``measure``
    adds figures (latency, bytes) to each passing recovered model's evaluation; ``on_pass(ratio,
    model)`` sees each passing recovered model (the walk never changes it afterwards)."""
    limit = pass_threshold(dense_acc, tolerance)

    def on_step(step: Step, recovered: nn.Module) -> None:
        if not step.passed(limit):
            return
        if measure is not None:
            step.after.extra.update(measure(recovered))
        if on_pass is not None:
            on_pass(step.ratio, recovered)

    kept, steps = iterative(net, method, sorted(grid), recover, evaluate, options,
                            stop=lambda s: not s.passed(limit), on_step=on_step)
    verdicts = [(s.ratio, s.passed(limit)) for s in steps]
    best = {rule: pick(verdicts, rule) for rule in RULES}
    result = SearchResult(dense_acc=dense_acc, threshold=limit, tolerance=tolerance, rule="contiguous",
                          best_ratio=best["contiguous"], best_ratio_highest=best["highest"],
                          best_ratio_contiguous=best["contiguous"], curve=steps, full_curve=False)
    return kept, result
