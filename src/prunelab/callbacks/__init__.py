"""Lightning callbacks, each with one job, for your own fits and for the pipeline; the
``callbacks`` config group builds them (``conf/callbacks/*.yaml``).

- ``pruning``: ``MaskKeeper`` (pruned weights held at zero while training), ``PruningCallback``
  (any registered method at fit start or end; ``MagnitudePruning``), ``RatioSearch``;
- ``latency``: ``LatencyCallback`` (the module served and timed as a run times it);
- ``checkpoint``: ``AtomicCheckpoint`` (kill-safe checkpoints) and ``ResumeState`` (per-batch RNG
  state, the training key stamp), and the resume finder ``ckpt_path=auto`` uses.

Importing this package is cheap: the names below load their module on first use (the fine-tune
needs the checkpoint callbacks without the search and deploy modules the others import).

None of them reparametrises weights (no ``weight_orig``/``weight_mask``): pruned weights are
plain zeros, so checkpoints, ``state_dict`` and timing always see a permanent, ordinary model.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "MaskKeeper": "pruning", "PruningCallback": "pruning", "MagnitudePruning": "pruning", "RatioSearch": "pruning",
    "LatencyCallback": "latency",
    "AtomicCheckpoint": "checkpoint", "ResumeState": "checkpoint",
}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"prunelab.callbacks.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'prunelab.callbacks' has no attribute {name!r}")
