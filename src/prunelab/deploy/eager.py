"""``latency.runtime=eager``: the model as trained, under the trainer's autocast."""

from __future__ import annotations

import torch
from torch import nn

from prunelab.deploy.form import Form
from prunelab.deploy.registry import Runtime
from prunelab.evaluation import autocast_for

# The dtype a Lightning precision computes in under autocast (what the agreement tolerance follows).
_AUTOCAST = {"bf16": torch.bfloat16, "16": torch.float16}


class Eager(Form):
    """The model as trained (weights untouched, shared with the caller), autocast per ``precision``."""

    runtime = "eager"

    def __init__(self, net: nn.Module, precision: str | None, channels_last: bool):
        p = next(net.parameters(), None)
        super().__init__(net, p.dtype if p is not None else torch.float32, channels_last,
                         p.device if p is not None else torch.device("cpu"))
        self.precision = precision
        prefix = str(precision or "32").split("-")[0]
        self.compute_dtype = _AUTOCAST.get(prefix, self.dtype) if str(precision).endswith("mixed") else self.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast_for(self.device, self.precision):
            return self.net(self.prepare(x))

    def describe(self) -> dict:
        return dict(super().describe(), precision=self.precision)


def eager_form(net: nn.Module, precision: str | None = None, channels_last: bool = False) -> Eager:
    """``latency.runtime=eager``: ``net`` as trained, its batches in the given layout, autocast per
    ``precision`` (a Lightning precision string). Never give it a model with sparse weights."""
    return Eager(net, precision, channels_last)


class EagerRuntime(Runtime):
    name = "eager"

    def build(self, net, spec, *, device, example_batch, two_four=False, channels_last=None):
        return eager_form(net, spec.precision, bool(channels_last))

    def load_snippet(self, path, spec):
        return None


RUNTIME = EagerRuntime()
