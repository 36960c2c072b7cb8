"""``latency.runtime=onnxruntime``: the folded model exported to ONNX (prunelab's exporter), run by
ONNX Runtime in float32 on the CPU. Ships as ``<name>.onnx``. Extra: ``prunelab[onnx]``."""

from __future__ import annotations

import contextlib
import copy
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from prunelab.deploy.form import Form
from prunelab.deploy.registry import Runtime
from prunelab.models.rewrite import INPUT_SIZE, fold_pool

EXPORT_PACKAGES = ("onnx", "onnxscript")  # prunelab's exporter (torch.onnx, dynamo) needs both


def folded_fp32(net: nn.Module, input_size: tuple[int, int]) -> tuple[nn.Module, tuple[int, int] | None, list[str]]:
    """(a float32 CPU eval copy of ``net`` with VGG's pool folded where exact, folded size, notes)."""
    notes, folded_at = [], None
    try:
        out = fold_pool(net, input_size)
        folded_at = tuple(input_size)
    except ValueError as exc:
        notes.append(f"pool not folded: {exc}")
        out = copy.deepcopy(net)
    return out.to("cpu", torch.float32).eval().requires_grad_(False), folded_at, notes


@contextlib.contextmanager
def _quiet(*names: str):
    loggers = [logging.getLogger(n) for n in names]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, before, strict=True):
            lg.setLevel(level)


class OnnxFile:
    """A network exported once to an ONNX file in a private temporary folder (removed with this
    object), the batch dimension dynamic; what the ONNX-based runtimes load."""

    def __init__(self, net: nn.Module, example_batch: torch.Tensor | None):
        from prunelab.export import export_onnx

        size = tuple(example_batch.shape[-2:]) if example_batch is not None else INPUT_SIZE
        self.net, self.folded_at, self.notes = folded_fp32(net, size)
        self._dir = tempfile.TemporaryDirectory(prefix="prunelab-onnx-")
        with _quiet("onnxscript", "onnx_ir", "torch.onnx"):  # the exporter's INFO lines, per model, would flood a run's log
            self.path = export_onnx(self.net, Path(self._dir.name) / "model.onnx", batch=2, input_size=size)
        self.input_size = size


def masked_dense_note(runtime: str) -> str:
    return (f"latency.runtime={runtime}: the 2:4 weights ran masked-dense (dense kernels on zeros), so no "
            "speedup is expected from them here")


class OnnxRuntimeForm(Form):
    """An ONNX Runtime CPU session over the exported model; float32 in, float32 logits out."""

    runtime = "onnxruntime"

    def __init__(self, exported: OnnxFile, two_four: bool):
        import onnxruntime as ort

        super().__init__(None, torch.float32, False, torch.device("cpu"))
        self.exported = exported
        self.notes = list(exported.notes)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(exported.path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.version = ort.__version__
        self.kernels = masked_dense_note(self.runtime) if two_four else None

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(device="cpu", dtype=torch.float32).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: self.prepare(x).numpy()})[0]
        return torch.from_numpy(out)

    def describe(self) -> dict:
        return dict(super().describe(), folded=self.exported.folded_at is not None,
                    library=f"onnxruntime {self.version}", providers=self.session.get_providers())


class OnnxBasedRuntime(Runtime):
    """A runtime over prunelab's ONNX export: served on the CPU, needing its own library and the
    exporter's packages (one extra installs them)."""

    cpu_only = True

    def __init__(self, name: str, library: str, extra: str, file_suffix: str):
        self.name, self.packages, self.extra = name, (library, *EXPORT_PACKAGES), extra
        self.file_suffix = file_suffix


class OnnxRuntime(OnnxBasedRuntime):
    def __init__(self):
        super().__init__("onnxruntime", library="onnxruntime", extra="onnx", file_suffix=".onnx")

    def build(self, net, spec, *, device, example_batch, two_four=False, channels_last=None):
        form = OnnxRuntimeForm(OnnxFile(net, example_batch), two_four)
        if spec.dtype != torch.float32:
            form.notes.append(f"ONNX Runtime runs float32 on the CPU (latency.dtype={spec.dtype_name} is for the "
                              "deploy, openvino and inductor runtimes)")
        return form

    def save(self, form, stem):
        path = stem.with_suffix(self.file_suffix)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        shutil.copyfile(form.exported.path, tmp)
        tmp.replace(path)
        return path

    def load_snippet(self, path, spec):
        return (f"import onnxruntime as ort\n\nsession = ort.InferenceSession({str(path)!r}, "
                "providers=[\"CPUExecutionProvider\"])\n"
                "# images: float32 numpy array (N, 3, H, W), normalised as in training\n"
                "logits = session.run(None, {\"input\": images})[0]")


RUNTIME = OnnxRuntime()
