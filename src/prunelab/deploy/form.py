"""What every served form is: an ``nn.Module`` the interleaved timer and the agreement check call.

A form takes float32 NCHW images on any device and casts them itself (``prepare``, which the timer
may call once up front); ``warm`` runs one untimed forward of a shape (capturing or compiling it
where the runtime does that); ``describe`` says what runs, for the report.
"""

from __future__ import annotations

import torch
from torch import nn

from prunelab.models.modes import eval_mode
from prunelab.models.rewrite import memory_format


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class Form(nn.Module):
    """A way of running a network: what the timer and ``agreement`` call.

    ``dtype`` is the precision the form computes in: the agreement check's tolerances follow it."""

    runtime = "form"
    use_graph = False  # the deploy runtime's CUDA graphs; every other form runs without one
    kernels: str | None = None  # what ran a 2:4 model's sparse layers, where the runtime says
    sparse = False

    def __init__(self, net: nn.Module | None, dtype: torch.dtype, channels_last: bool, device: torch.device):
        super().__init__()
        self.net = net
        self.dtype, self.channels_last, self.device = dtype, channels_last, torch.device(device)
        self.notes: list[str] = []

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the form's device, in its dtype and layout (a no-op when it already is)."""
        return x.to(device=self.device, dtype=self.dtype, memory_format=memory_format(self.channels_last))

    def warm(self, x: torch.Tensor) -> None:
        """One untimed forward of ``x``'s shape (captures or compiles it where needed)."""
        with torch.inference_mode(), eval_mode(self):
            self(x)

    def disable_graph(self, why: str) -> None:
        """Only the deploy runtime captures graphs; the others have none to turn off."""

    def describe(self) -> dict:
        return {"runtime": self.runtime, "dtype": dtype_name(self.dtype),
                "layout": "channels_last" if self.channels_last else "contiguous", "device": str(self.device),
                "notes": list(self.notes), "folded": False, "graph": False, "compile": False, "compile_s": None}
