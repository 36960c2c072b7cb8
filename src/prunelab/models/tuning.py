"""Per-layer kernel choice for float32 CPU inference, measured on the first batch of each shape.

A layer that can run more than one way (:class:`prunelab.models.winograd.TunedConv2d`,
:class:`prunelab.models.packed.TunedLinear`) times each way on the first batch of each input shape,
layout and thread count, as cuDNN's autotuning does on GPUs, and keeps an alternative only when it ran
at least ``MARGIN`` faster than the layer's plain kernel (``BASE``). Choices are shared within the
process by layer geometry, as cuDNN's autotuning cache is: a dense network and its magnitude-pruned
copy (the same shapes) run the same kernels, so their timings in turns differ by what pruning changed
and never by a tuning coin-flip (``clear_decisions`` forgets them). Each layer is timed alone, so a
choice is as good as those timings: on a machine shared with other work a layer can miss its faster
kernel (the answers never change). The plain kernel runs whenever the input is not float32 on the CPU
or gradients are wanted. Derived tensors (transformed or prepacked weights) are made on first use and
remade when the weight is replaced or changed in place through autograd's version counter (``mul_``,
``copy_``, also under ``no_grad``); a change through ``.data`` bypasses that counter: call
``invalidate`` after one. Weights made in inference mode have no counter, so nothing is cached for them.
"""

from __future__ import annotations

import time

import torch
from torch import nn

MARGIN = 0.05  # an alternative must beat the plain kernel by this fraction to be kept
TUNE_ROUNDS = 5  # timed calls of each way, in turns, after one untimed call; the fastest counts
# Choices made in this process, by layer geometry (kind, input shape, layout, threads, layer sizes):
# {geometry: (algorithm, ms of each)}. Speed depends on the geometry, not the weights' values.
_DECISIONS: dict[tuple, tuple[str, dict[str, float]]] = {}


def clear_decisions() -> None:
    """Forget every choice made in this process (the next batch of each shape is timed again)."""
    _DECISIONS.clear()


def pick(times: dict[str, float], margin: float = MARGIN, base: str = "direct") -> str:
    """The algorithm to keep from measured seconds: the fastest alternative when it beat ``base``
    by at least ``margin`` (a fraction of base's time), else ``base``."""
    if base not in times:
        raise ValueError(f"pick needs the {base} kernel's time, got {sorted(times)}")
    alts = {a: t for a, t in times.items() if a != base}
    if not alts:
        return base
    best = min(alts, key=alts.get)
    return best if alts[best] <= times[base] * (1 - margin) else base


class Tuned:
    """Mixin for an ``nn.Module`` layer with a weight (and optional bias) that runs as the fastest of
    several ways. Subclasses set ``BASE``/``ALGOS``, call :meth:`_init_tuning`, and define
    ``candidates(x)``, ``run(algo, x)`` and ``geometry()`` (the layer sizes that set its speed)."""

    BASE = "direct"
    ALGOS: tuple[str, ...] = ("direct",)

    def _init_tuning(self, algo: str) -> None:
        if algo != "auto" and algo not in self.ALGOS:
            raise ValueError(f"algo={algo!r}: use auto or one of {', '.join(self.ALGOS)}")
        self.algo = algo
        self.choice: dict[tuple, str] = {}  # input shape -> algorithm
        self.tune_ms: dict[tuple, dict[str, float]] = {}  # input shape -> fastest ms of each algorithm
        self.reused: set[tuple] = set()  # shapes whose choice came from another layer of the same geometry
        self._cache: dict = {}  # derived tensors, keyed by what they were made from

    def _fast_path(self, x: torch.Tensor) -> bool:
        wt = self.weight
        bias_grad = self.bias is not None and self.bias.requires_grad
        grads = torch.is_grad_enabled() and (x.requires_grad or wt.requires_grad or bias_grad)
        return (not grads and x.device.type == "cpu" and x.dtype == torch.float32
                and wt.dtype == torch.float32 and wt.device.type == "cpu" and wt.layout == torch.strided)

    def _derived(self, name, make, source: torch.Tensor | None = None):
        """``make()``, cached until ``source`` (default: the weight) is replaced or changed in place."""
        src = self.weight if source is None else source
        try:
            version = src._version
        except RuntimeError:  # an inference-mode tensor has no version counter: a change would go unseen
            return make()
        key = (name, src.data_ptr(), version)
        value = self._cache.get(key)
        if value is None:
            value = make()
            # A new dict, swapped in whole: another thread tuning this layer sees the old or the new one.
            self._cache = {**{k: v for k, v in self._cache.items() if k[0] != name}, key: value}
        return value

    def __getstate__(self) -> dict:
        # Derived tensors are remade on first use; oneDNN's packed ones have no storage to copy or pickle.
        state = self.__dict__.copy()
        state["_cache"] = {}
        return state

    def invalidate(self) -> None:
        """Forget the derived weights (after changing the weight through ``.data``)."""
        self._cache = {}

    def uses(self, cache_key) -> str:
        """The algorithm a derived tensor's cache key serves (what is dropped once no shape uses it)."""
        return self.BASE

    def _tune(self, x: torch.Tensor, key: tuple) -> str:
        geometry = (type(self).__name__, *key, *self.geometry())
        if geometry in _DECISIONS:  # the same layer shape was timed already in this process
            choice, ms = _DECISIONS[geometry]
            self.choice[key], self.tune_ms[key] = choice, dict(ms)
            self.reused.add(key)
            return choice
        algos = self.candidates(x)
        for algo in algos:  # untimed: builds the derived tensors and warms the caches
            self.run(algo, x)
        best = {algo: float("inf") for algo in algos}
        for round_ in range(TUNE_ROUNDS):
            if round_:  # after the first timed round, stop timing what ran at half the base's speed or worse
                algos = [a for a in algos if a == self.BASE or best[a] < 2 * best[self.BASE]]
            for algo in algos:
                t0 = time.perf_counter()
                self.run(algo, x)
                best[algo] = min(best[algo], time.perf_counter() - t0)
        self.tune_ms[key] = {a: round(t * 1e3, 3) for a, t in best.items()}
        choice = self.choice[key] = pick(best, base=self.BASE)
        _DECISIONS[geometry] = (choice, dict(self.tune_ms[key]))
        kept = set(self.choice.values())
        # Drop the derived weights no tuned shape uses (Winograd filters take 4x the weights' memory).
        self._cache = {k: v for k, v in self._cache.items() if self.uses(k) in kept}
        return choice

    def tuned_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.algo != "auto":
            return self.run(self.algo, x)
        key = self.shape_key(x)
        algo = self.choice.get(key)
        if algo is None:
            algo = self._tune(x, key)
        return self.run(algo, x)

    @staticmethod
    def shape_key(x: torch.Tensor) -> tuple:
        """What a choice is made for: the input shape, its layout and the threads the kernels get."""
        layout = "nhwc" if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) else "nchw"
        return (*x.shape, layout if x.dim() == 4 else "rows", torch.get_num_threads())


def tune_record(net: nn.Module, kind: type | None = None) -> list[dict]:
    """Per tuned layer (of ``kind``, default every one) and shape: the input shape, the milliseconds each algorithm took, the choice, and
    whether it was reused from an earlier layer of the same geometry."""
    return [{"layer": name, "input": list(key[:-2]), "layout": key[-2], "threads": key[-1], "ms": m.tune_ms[key],
             "choice": m.choice[key], "reused": key in m.reused}
            for name, m in net.named_modules() if isinstance(m, kind or Tuned) for key in m.tune_ms]


def algo_counts_by_batch(net: nn.Module, kind: type) -> dict[int, dict[str, int]]:
    """{batch size: {algorithm: layers}} over the shapes each ``kind`` layer of ``net`` has tuned."""
    out: dict[int, dict[str, int]] = {}
    for m in net.modules():
        if isinstance(m, kind):
            for key, choice in m.choice.items():
                counts = out.setdefault(key[0], {})
                counts[choice] = counts.get(choice, 0) + 1
    return dict(sorted(out.items()))
