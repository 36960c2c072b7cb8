"""ONNX Runtime on a GPU: usable only where the installed build has the CUDA provider, and then run
with the images bound in GPU memory; the shipped snippet names the provider it was timed with."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prunelab.deploy import registry
from prunelab.hardware import Hardware, detect

HAS_ORT = registry.get("onnxruntime").missing() is None
pytestmark = pytest.mark.skipif(not HAS_ORT, reason="no onnx extra")
GPU = Hardware(kind="cuda", name="a GPU", cuda_capability=(9, 0))


def test_onnxruntime_on_a_gpu_needs_the_cuda_provider(monkeypatch):
    import onnxruntime as ort

    runtime = registry.get("onnxruntime")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    why = runtime.unusable(GPU)
    assert why and "CUDAExecutionProvider" in why and "onnxruntime-gpu" in why and "CPUExecutionProvider" in why
    assert "onnxruntime" in registry.usable(GPU, ["onnxruntime"])[1]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert runtime.unusable(GPU) is None and runtime.unusable(detect("cpu")) is None


def test_openvino_stays_on_the_cpu():
    assert "not on cuda" in registry.get("openvino").unusable(GPU)


def test_the_snippet_names_the_provider_the_model_was_timed_with():
    from types import SimpleNamespace

    runtime = registry.get("onnxruntime")
    on_gpu = runtime.load_snippet(Path("m.onnx"), SimpleNamespace(hardware=GPU))
    on_cpu = runtime.load_snippet(Path("m.onnx"), SimpleNamespace(hardware=detect("cpu")))
    assert '"CUDAExecutionProvider", "CPUExecutionProvider"' in on_gpu
    assert "CUDAExecutionProvider" not in on_cpu and '["CPUExecutionProvider"]' in on_cpu


@pytest.mark.gpu
def test_onnxruntime_cuda_form_agrees_with_eager_on_the_gpu():
    from prunelab.deploy.onnxrt import OnnxFile, OnnxRuntimeForm, cuda_provider_missing

    if not torch.cuda.is_available() or cuda_provider_missing():
        pytest.skip("needs a GPU and onnxruntime-gpu")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 10)).eval()
    x = torch.randn(4, 3, 32, 32)
    form = OnnxRuntimeForm(OnnxFile(net, x), two_four=False, device=torch.device("cuda"))
    got = form(x.cuda())
    assert got.device.type == "cuda" and "CUDAExecutionProvider" in form.describe()["providers"]
    torch.testing.assert_close(got.cpu(), net(x).detach(), rtol=1e-4, atol=1e-4)
