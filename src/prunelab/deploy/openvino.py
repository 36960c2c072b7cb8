"""``latency.runtime=openvino``: the folded model exported to ONNX (prunelab's exporter), read by
OpenVINO and compiled for the CPU once per batch shape, with OpenVINO's inference precision hint
set from ``latency.dtype`` (bf16 where the CPU has native bf16, else f32). Ships as OpenVINO IR
(``<name>.xml`` + ``.bin``, float32 weights). Extra: ``prunelab[openvino]``."""

from __future__ import annotations

import time

import torch

from prunelab.deploy.form import Form
from prunelab.deploy.onnxrt import OnnxBasedRuntime, OnnxFile, masked_dense_note

PRECISION_HINT = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def compile_config(dtype: torch.dtype) -> dict[str, str]:
    """OpenVINO CPU properties for a served model: one request at a time, in ``dtype``."""
    return {"INFERENCE_PRECISION_HINT": PRECISION_HINT[dtype], "PERFORMANCE_HINT": "LATENCY"}


class OpenVinoForm(Form):
    """An OpenVINO model compiled per batch shape (a static shape each, as a server would pin)."""

    runtime = "openvino"

    def __init__(self, exported: OnnxFile, dtype: torch.dtype, two_four: bool):
        import openvino as ov

        super().__init__(None, dtype, False, torch.device("cpu"))
        self.exported = exported
        self.notes = list(exported.notes)
        self.core = ov.Core()
        self.model = self.core.read_model(str(exported.path))
        self.config = compile_config(dtype)
        self.version = ov.__version__
        self._requests: dict[tuple, object] = {}
        self.compile_s: dict[int, float] = {}
        self.kernels = masked_dense_note(self.runtime) if two_four else None

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(device="cpu", dtype=torch.float32).contiguous()  # OpenVINO casts inside the compiled model

    def _request(self, shape: tuple):
        req = self._requests.get(shape)
        if req is None:
            t0 = time.perf_counter()
            model = self.model.clone()
            model.reshape(list(shape))
            compiled = self.core.compile_model(model, "CPU", self.config)
            req = self._requests[shape] = compiled.create_infer_request()
            self.compile_s[shape[0]] = time.perf_counter() - t0
            got = compiled.get_property("INFERENCE_PRECISION_HINT")  # what OpenVINO will really compute in
            self.inference_precision = got.get_type_name() if hasattr(got, "get_type_name") else str(got)
        return req

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prepare(x)
        req = self._request(tuple(x.shape))
        req.infer({0: x.numpy()})
        # The request's output buffer is reused by its next call: hand out a copy (logits are small).
        return torch.from_numpy(req.get_output_tensor(0).data.copy())

    def describe(self) -> dict:
        return dict(super().describe(), folded=self.exported.folded_at is not None, library=f"openvino {self.version}",
                    inference_precision=getattr(self, "inference_precision", self.config["INFERENCE_PRECISION_HINT"]),
                    compile_s=round(sum(self.compile_s.values()), 3))


class OpenVinoRuntime(OnnxBasedRuntime):
    def __init__(self):
        super().__init__("openvino", library="openvino", extra="openvino", file_suffix=".xml")

    def build(self, net, spec, *, device, example_batch, two_four=False, channels_last=None):
        return OpenVinoForm(OnnxFile(net, example_batch), spec.dtype, two_four)

    def save(self, form, stem):
        import openvino as ov

        path = stem.with_suffix(self.file_suffix)
        path.parent.mkdir(parents=True, exist_ok=True)
        # The batch stays dynamic in the file; float32 weights, as timed (the hint sets the compute precision).
        ov.save_model(form.model, str(path), compress_to_fp16=False)
        return path

    def load_snippet(self, path, spec):
        return (f"import openvino as ov\n\ncompiled = ov.Core().compile_model({str(path)!r}, \"CPU\", "
                f"{compile_config(spec.dtype)!r})\n"
                "# images: float32 numpy array (N, 3, H, W), normalised as in training\n"
                "logits = compiled(images)[0]")


RUNTIME = OpenVinoRuntime()
