"""Per-batch forward latency: a pure percentile helper and a timer that tells the truth.

The timer runs the model in eval and inference mode, warms up first, and waits for the device
before reading the clock (CUDA events on GPU). By default the batch is already on the device;
``include_transfer=True`` times the host-to-device copy too, as the notebook did.
``paired_stats`` turns two interleaved series into a speedup with its per-iteration noise.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from prunelab.evaluation import autocast_for
from prunelab.models.modes import eval_mode


def percentiles(samples: Sequence[float], qs: Sequence[float] = (50, 90, 99)) -> dict[str, float]:
    """{'p50': ..., 'p90': ...} by linear interpolation (numpy's default, as the notebook used)."""
    if len(samples) == 0:
        raise ValueError("no latency samples")
    arr = np.asarray(samples, dtype=np.float64)
    return {f"p{q:g}": float(np.percentile(arr, q)) for q in qs}


def coefficient_of_variation(samples: Sequence[float]) -> float:
    """Sample standard deviation over the mean (0 for fewer than two samples): how much one
    model's timings varied, the machine's load included."""
    arr = np.asarray(samples, dtype=np.float64)
    if arr.size < 2 or arr.mean() == 0:
        return 0.0
    return float(arr.std(ddof=1) / arr.mean())


def summarize(samples_ms: Sequence[float], batch_size: int) -> dict:
    stats = percentiles(samples_ms)
    stats["mean"] = float(np.mean(samples_ms))
    stats["cv"] = coefficient_of_variation(samples_ms)
    stats["iters"] = len(samples_ms)
    stats["batch_size"] = batch_size
    stats["images_per_s"] = batch_size / (stats["p50"] / 1000.0)
    return stats


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _one_forward(model: nn.Module, host: torch.Tensor, on_device: torch.Tensor, device: torch.device,
                 include_transfer: bool) -> float:
    """Milliseconds of one forward pass, read only once the device has finished it."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        x = host.to(device, non_blocking=True) if include_transfer else on_device
        model(x)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    _sync(device)
    t0 = time.perf_counter()
    x = host.to(device) if include_transfer else on_device
    model(x)
    _sync(device)
    return (time.perf_counter() - t0) * 1000.0


@torch.inference_mode()
def time_interleaved(
    models: Mapping[str, nn.Module],
    batch: torch.Tensor,
    device: torch.device | str = "cpu",
    warmup: int = 5,
    iters: int = 30,
    include_transfer: bool = False,
    precision: str | None = None,
    rotate: bool = False,
) -> dict[str, list[float]]:
    """Milliseconds per forward pass for each model, the models taking turns every iteration.

    Taking turns makes a drift in machine load (another job, clock changes) hit every model
    alike, so ratios between them stay honest where back-to-back runs would not. ``rotate``: each
    iteration starts one model later, so no model always runs right after the same one (with more
    than two models, a fixed order could favour a position).
    """
    if iters < 1 or warmup < 0:
        raise ValueError(f"latency.iters must be >= 1 and latency.warmup >= 0, got {iters}, {warmup}")
    device = torch.device(device)
    # A batch already on the GPU has nothing to pin (pin_memory raises there); it is timed as it is.
    host = batch.pin_memory() if include_transfer and device.type == "cuda" and batch.device.type == "cpu" else batch
    on_device = batch.to(device)
    samples: dict[str, list[float]] = {k: [] for k in models}
    with eval_mode(*models.values()), autocast_for(device, precision):
        for m in models.values():
            for _ in range(warmup):
                _one_forward(m, host, on_device, device, include_transfer)
        order = list(models.items())
        for i in range(iters):
            shift = i % len(order) if rotate else 0
            for k, m in order[shift:] + order[:shift]:
                samples[k].append(_one_forward(m, host, on_device, device, include_transfer))
    return samples


def paired_stats(dense_ms: Sequence[float], pruned_ms: Sequence[float], batch_size: int) -> dict:
    """Stats of two series timed in turns, their speedup (ratio of p50s), and the spread of the
    per-iteration ratios dense_i / pruned_i: iteration i ran both back to back, so a load drift
    hits both and the 5-95% range of these ratios is the noise of this very timing."""
    if len(dense_ms) != len(pruned_ms):
        raise ValueError(f"paired series differ in length: {len(dense_ms)} vs {len(pruned_ms)}")
    ratios = np.asarray(dense_ms, dtype=np.float64) / np.asarray(pruned_ms, dtype=np.float64)
    dense, pruned = summarize(dense_ms, batch_size), summarize(pruned_ms, batch_size)
    spread = percentiles(ratios, (5, 50, 95))
    return {"dense": dense, "pruned": pruned, "speedup_p50": dense["p50"] / pruned["p50"], "paired_ratio": spread}


def time_forward(model: nn.Module, batch: torch.Tensor, *args, **kwargs) -> list[float]:
    """Milliseconds per forward pass of ``batch``, one sample per iteration after warm-up
    (further arguments as :func:`time_interleaved`)."""
    return time_interleaved({"model": model}, batch, *args, **kwargs)["model"]


def sample_batch(dataset, batch_size: int) -> torch.Tensor:
    """The first ``batch_size`` images of a split (repeated if the split is smaller)."""
    xs = [dataset[i % len(dataset)][0] for i in range(batch_size)]
    return torch.stack(xs)


def latency_batches(dataset, sizes: Iterable[int]) -> dict[int, torch.Tensor]:
    """{batch size: the first images of ``dataset``} for every size in ``sizes`` (a resolved
    ``DeploySpec``'s ``batch_sizes``, which always hold the headline ``batch_size``)."""
    sizes = sorted({int(b) for b in sizes})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"latency batch sizes must be >= 1, got {sizes}")
    largest = sample_batch(dataset, sizes[-1])
    return {b: largest[:b].clone() for b in sizes}
