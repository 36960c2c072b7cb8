"""``latency.runtime=onnxruntime``: the folded model exported to ONNX (prunelab's exporter), run by
ONNX Runtime in float32: on the CPU, or on a GPU through ONNX Runtime's CUDA provider where the
installed build has one (``onnxruntime-gpu``), the images handed over in GPU memory. Ships as
``<name>.onnx``. Extra: ``prunelab[onnx]``."""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from prunelab.deploy.form import Form
from prunelab.deploy.registry import Runtime
from prunelab.models.rewrite import INPUT_SIZE, folded_copy

EXPORT_PACKAGES = ("onnx", "onnxscript")  # prunelab's exporter (torch.onnx, dynamo) needs both


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
        net, self.folded_at, self.notes = folded_copy(net, size)
        self.net = net.to("cpu", torch.float32).eval().requires_grad_(False)
        self._dir = tempfile.TemporaryDirectory(prefix="prunelab-onnx-")
        with _quiet("onnxscript", "onnx_ir", "torch.onnx"):  # the exporter's INFO lines, per model, would flood a run's log
            self.path = export_onnx(self.net, Path(self._dir.name) / "model.onnx", batch=2, input_size=size)
        self.input_size = size


def masked_dense_note(runtime: str) -> str:
    return (f"latency.runtime={runtime}: the 2:4 weights ran masked-dense (dense kernels on zeros), so no "
            "speedup is expected from them here")


CUDA_PROVIDER = "CUDAExecutionProvider"


def cuda_provider_missing() -> str | None:
    """Why ONNX Runtime cannot run on a GPU here, else None (its CUDA provider is in this build)."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    if CUDA_PROVIDER in have:
        return None
    return (f"latency.runtime=onnxruntime on a GPU needs ONNX Runtime's {CUDA_PROVIDER} (pip install onnxruntime-gpu); "
            f"this build has {', '.join(have)}")


class OnnxRuntimeForm(Form):
    """An ONNX Runtime session over the exported model; float32 in, float32 logits out. On a GPU the
    images are bound in place (I/O binding), so the timing holds no host copy of the batch."""

    runtime = "onnxruntime"

    def __init__(self, exported: OnnxFile, two_four: bool, device: torch.device | str = "cpu"):
        import onnxruntime as ort

        device = torch.device(device)
        super().__init__(None, torch.float32, False, device)
        self.exported = exported
        self.notes = list(exported.notes)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.on_gpu = device.type == "cuda"
        providers = ([(CUDA_PROVIDER, {"device_id": device.index or 0}), "CPUExecutionProvider"] if self.on_gpu
                     else ["CPUExecutionProvider"])
        self.session = ort.InferenceSession(str(exported.path), opts, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.version = ort.__version__
        self.kernels = masked_dense_note(self.runtime) if two_four else None

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(device=self.device, dtype=torch.float32).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prepare(x)
        if not self.on_gpu:
            return torch.from_numpy(self.session.run(None, {self.input_name: x.numpy()})[0])
        binding = self.session.io_binding()
        binding.bind_input(self.input_name, "cuda", self.device.index or 0, np.float32, tuple(x.shape), x.data_ptr())
        binding.bind_output(self.output_name, "cuda", self.device.index or 0)
        torch.cuda.current_stream(self.device).synchronize()  # x is written on torch's stream; ORT reads on its own
        self.session.run_with_iobinding(binding)
        return torch.from_numpy(binding.copy_outputs_to_cpu()[0]).to(self.device)  # logits: a few KB

    def describe(self) -> dict:
        return dict(super().describe(), folded=self.exported.folded_at is not None,
                    library=f"onnxruntime {self.version}", providers=self.session.get_providers())


class OnnxBasedRuntime(Runtime):
    """A runtime over prunelab's ONNX export: served on the CPU (unless a subclass says otherwise),
    needing its own library and the exporter's packages (one extra installs them)."""

    cpu_only = True

    def __init__(self, name: str, library: str, extra: str, file_suffix: str):
        self.name, self.packages, self.extra = name, (library, *EXPORT_PACKAGES), extra
        self.file_suffix = file_suffix


class OnnxRuntime(OnnxBasedRuntime):
    cpu_only = False  # a GPU too, where the installed build has the CUDA provider

    def __init__(self):
        super().__init__("onnxruntime", library="onnxruntime", extra="onnx", file_suffix=".onnx")

    def unusable(self, hw):
        if hw.kind == "cuda":
            return cuda_provider_missing()
        return None if hw.kind == "cpu" else f"latency.runtime=onnxruntime runs on the CPU or a CUDA GPU, not {hw.kind}"

    def build(self, net, spec, *, device, example_batch, two_four=False, channels_last=None):
        form = OnnxRuntimeForm(OnnxFile(net, example_batch), two_four, device)
        if spec.dtype != torch.float32:
            form.notes.append(f"ONNX Runtime runs float32 (latency.dtype={spec.dtype_name} is for the "
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
        providers = f'["{CUDA_PROVIDER}", "CPUExecutionProvider"]' if spec.hardware.kind == "cuda" \
            else '["CPUExecutionProvider"]'
        return (f"import onnxruntime as ort\n\nsession = ort.InferenceSession({str(path)!r}, "
                f"providers={providers})\n"
                "# images: float32 numpy array (N, 3, H, W), normalised as in training\n"
                "logits = session.run(None, {\"input\": images})[0]")


RUNTIME = OnnxRuntime()
