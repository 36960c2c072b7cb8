"""``latency.runtime=inductor``: ``torch.compile`` (the Inductor backend) over the folded model with
its weights frozen as constants (Inductor's ``freezing`` option, which applies in inference mode),
in ``latency.dtype`` and the deploy layout, one specialisation per batch shape. No file format of
its own: it ships as the state_dict, and the report shows the lines that compile it."""

from __future__ import annotations

import shutil
import time

import torch

from prunelab.deploy.form import Form
from prunelab.deploy.registry import Runtime
from prunelab.models.rewrite import INPUT_SIZE, folded_copy, memory_format


class CompiledForm(Form):
    runtime = "inductor"

    def __init__(self, net, *, dtype, channels_last, device, folded_at, notes, graphs: bool):
        super().__init__(net, dtype, channels_last, device)
        self.folded_at, self.notes = folded_at, list(notes)
        mode = "reduce-overhead" if graphs else None
        self.compiled = torch.compile(net, dynamic=False, mode=mode, options=None if graphs else {"freezing": True})
        self.graphs = graphs
        self.compile_s: dict[int, float] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prepare(x)
        with torch.inference_mode():  # always: freezing applies there, and one grad mode means no recompiles
            if self.graphs:
                torch.compiler.cudagraph_mark_step_begin()
            t0 = time.perf_counter()
            out = self.compiled(x)
            if x.shape[0] not in self.compile_s:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                self.compile_s[x.shape[0]] = time.perf_counter() - t0
        return out.clone() if self.graphs else out

    def describe(self) -> dict:
        return dict(super().describe(), folded=self.folded_at is not None, compile=True, frozen=not self.graphs,
                    compile_s=round(sum(self.compile_s.values()), 3), library=f"torch {torch.__version__} inductor")


def _compiler() -> str | None:
    return next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)


class InductorRuntime(Runtime):
    name = "inductor"

    def unusable(self, hw):
        if hw.kind == "cpu" and _compiler() is None:
            return "latency.runtime=inductor compiles C++ on the CPU, and this machine has no C++ compiler (c++/g++)"
        return None

    def build(self, net, spec, *, device, example_batch, two_four=False, channels_last=None):
        size = tuple(example_batch.shape[-2:]) if example_batch is not None else INPUT_SIZE
        served, folded_at, notes = folded_copy(net, size)
        layout = spec.channels_last if channels_last is None else channels_last
        served = served.eval().requires_grad_(False).to(device=device, dtype=spec.dtype,
                                                        memory_format=memory_format(layout))
        graphs = torch.device(device).type == "cuda" and spec.cuda_graph
        form = CompiledForm(served, dtype=spec.dtype, channels_last=layout, device=device, folded_at=folded_at,
                            notes=notes, graphs=graphs)
        if two_four:
            form.kernels = ("latency.runtime=inductor: the 2:4 weights ran masked-dense (dense kernels on zeros)")
        if example_batch is not None:
            form.warm(example_batch)
        return form

    def load_snippet(self, path, spec):
        layout = "torch.channels_last" if spec.channels_last else "torch.contiguous_format"
        return (f"net = net.eval().to(torch.{spec.dtype_name}, memory_format={layout})  # the network, loaded as above\n"
                "fast = torch.compile(net, dynamic=False, options={\"freezing\": True})\n"
                "with torch.inference_mode():\n"
                f"    logits = fast(images.to(torch.{spec.dtype_name}, memory_format={layout}))")


RUNTIME = InductorRuntime()
