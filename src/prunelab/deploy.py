"""How a pruned model is shipped and timed: the way it will really run.

- magnitude: dense kernels on a dense tensor with zeros (no speedup expected);
- channel: the smaller dense network;
- semi_structured: PyTorch's 2:4 sparse kernels on a CUDA device of compute capability 8.0+,
  masked-dense elsewhere (and the report says so);
- optionally the exported ONNX model under onnxruntime on the CPU.

Files: unstructured methods save a plain torchvision state_dict (``pruned.pt``); channel-pruned
networks save their channel counts (JSON) and weights (safetensors), loaded by
``prunelab.pruning.channel.load_channel_pruned``. The report also gives the bytes the sparse
weights take when stored compactly.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import nn

from prunelab.io import compressed_bytes, save_state_dict
from prunelab.latency import LatencyMonitor, summarize

log = logging.getLogger(__name__)


def time_as_deployed(method: str, net: nn.Module, batch: torch.Tensor, device, monitor: LatencyMonitor,
                     loggers=(), dense: nn.Module | None = None) -> tuple[dict, str | None, dict | None]:
    """The pruned model's latency, the kernel note, and, when ``dense`` is given, the dense
    model's latency timed in turns with the pruned one (so the speedup is not a load drift)."""
    if method == "semi_structured":
        stats, note = _time_two_four(net, batch, device, monitor, loggers)
        return stats, note, None
    if dense is not None and dense is not net:
        both = monitor.measure_interleaved({"dense": dense, "pruned": net}, batch, device, loggers)
        return both["pruned"], None, both["dense"]
    return monitor.measure(net, batch, device, "pruned", loggers), None, None


def _time_two_four(net: nn.Module, batch: torch.Tensor, device, monitor: LatencyMonitor,
                   loggers=()) -> tuple[dict, str | None]:
    """2:4 weights on the sparse kernels where they exist (CUDA sm80+), masked-dense elsewhere."""
    from prunelab.pruning.semi_structured import to_sparse_kernels

    if device.type == "cuda":
        sparse, used, reason = to_sparse_kernels(copy.deepcopy(net))
        if used:
            dtype = next(p.dtype for p in sparse.parameters())
            stats = monitor.measure(sparse, batch.to(dtype), device, "pruned", loggers)
            stats["dtype"] = str(dtype)
            return stats, f"2:4 layers timed with PyTorch semi-structured sparse kernels ({dtype})."
    else:
        reason = "no CUDA device of compute capability >= 8.0: 2:4 weights ran masked-dense"
    return monitor.measure(net, batch, device, "pruned", loggers), f"No sparse kernel used: {reason}."


def onnx_latency(net: nn.Module, batch: torch.Tensor, path: Path, cfg) -> dict | None:
    """Export ``net`` to ONNX and time it with onnxruntime on the CPU; None without onnxruntime."""
    import time

    from prunelab.export import export_onnx, require_onnx

    ort = require_onnx()  # without the export extra: one line naming it, exit 2

    cpu_net = copy.deepcopy(net).to("cpu").eval()
    x = batch.to("cpu").float()
    path.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(cpu_net, path, batch=x.shape[0])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    feed = {name: x.numpy()}
    samples = []
    for i in range(cfg.warmup + cfg.iters):
        t0 = time.perf_counter()
        session.run(None, feed)
        if i >= cfg.warmup:
            samples.append((time.perf_counter() - t0) * 1000.0)
    stats = summarize(samples, x.shape[0])
    stats.update(runtime=f"onnxruntime {ort.__version__} CPU", file=str(path))
    return stats


def save_pruned(method: str, net: nn.Module, models_dir: Path, arch: str, num_classes: int) -> dict:
    """Write the pruned model in its compact form; returns the bytes on disk."""
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    if method == "channel":
        from prunelab.pruning.channel import META_FILE, WEIGHTS_FILE, save_channel_pruned

        save_channel_pruned(net, models_dir, arch=arch, num_classes=num_classes)
        size = sum((models_dir / f).stat().st_size for f in (META_FILE, WEIGHTS_FILE))
        return {"pruned_bytes": size, "pruned_compressed_bytes": compressed_bytes(state), "pruned_format": "channels+safetensors"}
    path = save_state_dict(models_dir / "pruned.pt", state)
    return {"pruned_bytes": path.stat().st_size, "pruned_compressed_bytes": compressed_bytes(state),
            "pruned_format": "state_dict"}



