"""Run a network in eval mode for a while and hand it back exactly as it was.

Evaluation, timing, tracing and shape probes all need eval mode (dropout off, BatchNorm on its
running statistics) but must not change a caller's module that was training: every flag, of
every submodule, is restored, since a traced graph or a caller may have set them one by one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, training in modes:
            m.training = training
