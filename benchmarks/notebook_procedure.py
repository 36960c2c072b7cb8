"""The reference notebook's procedure, re-implemented (not copied) as the benchmark's baseline.

What it does, as the notebook did it (../shared/reference/notebook.txt):

- every candidate ratio gets a freshly built model whose state_dict is read from disk again
  (``torch.load(..., weights_only=True)``), then ``torch.nn.utils.prune.l1_unstructured`` on the
  weight of every Conv2d and Linear (same fraction in every layer), then ``prune.remove``;
- the coarse grid (0.2 ... 0.9) is pruned first, keeping every pruned model alive in a dict, and
  only then evaluated (the notebook's two cells); the refinement then builds, prunes and
  evaluates one model per ratio at ``step`` spacing between the last passing and the first
  failing coarse ratio (written as the notebook wrote its grid, ``lo + step * i``);
- evaluation is the notebook's plain loop: a DataLoader (batch 128, 2 workers), copy to the
  device, forward, ``torch.max`` over the logits, count;
- latency is the notebook's: ``time.time()`` per validation batch around the host-to-device
  copy, forward and argmax, with no device synchronisation, then numpy's p50/p90;
- fine-tuning is the notebook's plain SGD loop.

Differences, all forced by the offline machine or by the comparison: the model is built with
``weights=None`` (the notebook built it with ImageNet weights, which its ``load_state_dict``
then overwrote); the refinement span follows ``rule`` (the notebook picked its span by eye); and
the answer is read with either rule, the notebook's own ``highest`` always recorded beside it.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader, Dataset
from torchvision import models as tvm

from prunelab.search.rules import pick

COARSE_GRID = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
RULES = ("contiguous", "highest")


# -- pure helpers ------------------------------------------------------------------------------
def passes(acc: float, dense_acc: float, tolerance: float) -> bool:
    """The notebook's test: accuracy >= dense accuracy - tolerance (percentage points)."""
    return acc >= dense_acc - tolerance


def answer(curve: Iterable[tuple[float, bool]], rule: str) -> float:
    """The ratio a rule picks from (ratio, passed) pairs; 0.0 when nothing qualifies.

    ``highest`` is the notebook's loop: the last passing ratio, failures below it ignored.
    ``contiguous`` stops at the first failure.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    return pick(curve, rule)  # the rules themselves are prunelab's; only the procedure differs


def refinement_span(coarse: Iterable[tuple[float, bool]], rule: str) -> tuple[float, float] | None:
    """(last passing, first failing above it) on the coarse curve under ``rule``; None when there
    is nothing to refine (every coarse ratio passed)."""
    coarse = sorted(coarse)
    lo = answer(coarse, rule)
    above = [r for r, ok in coarse if r > lo and not ok]
    if not above:
        return None
    return lo, above[0]


def refinement_grid(lo: float, hi: float, step: float = 0.01) -> list[float]:
    """Ratios strictly between ``lo`` and ``hi`` at ``step``, in the notebook's float arithmetic
    (``lo + step * i``, so 0.25 + 0.01 * 9 stays 0.33999999999999997). Endpoints are coarse
    ratios already evaluated."""
    if step <= 0:
        raise ValueError(f"step must be > 0, got {step}")
    n = int(round((hi - lo) / step))
    return [lo + step * i for i in range(1, n) if lo + step * i < hi - 1e-9]


def p50_p90(samples: Sequence[float]) -> tuple[float, float]:
    arr = np.array(samples)
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 90))


# -- the notebook's model, pruning and loops -----------------------------------------------------
def build_model(arch: str = "vgg16", num_classes: int = 10) -> nn.Module:
    """A torchvision ``arch`` with its last Linear swapped for a ``num_classes`` head (VGG16's
    ``classifier[6]``)."""
    model = tvm.get_model(arch, weights=None)
    name = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, nn.Linear(old.in_features, num_classes))
    return model


def fresh_model(arch: str, weights_path: str, device: torch.device, timer: dict | None = None) -> nn.Module:
    """Build, move to the device, load the state_dict from disk: the notebook's cell per candidate."""
    t0 = time.perf_counter()
    model = build_model(arch).to(device)
    t1 = time.perf_counter()
    model.load_state_dict(torch.load(weights_path, map_location=device, weights_only=True))
    t2 = time.perf_counter()
    if timer is not None:
        timer["build"] = timer.get("build", 0.0) + t1 - t0
        timer["load"] = timer.get("load", 0.0) + t2 - t1
    return model


def _prunable(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def prune_layerwise(model: nn.Module, amount: float) -> nn.Module:
    """``l1_unstructured`` at ``amount`` on every Conv2d and Linear weight, then made permanent."""
    for m in _prunable(model):
        prune.l1_unstructured(m, name="weight", amount=amount)
    for m in _prunable(model):
        try:
            prune.remove(m, "weight")
        except ValueError:
            pass
    return model


def val_loader(dataset: Dataset, batch_size: int = 128, num_workers: int = 2) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, int]:
    """Accuracy in percent and images seen, the notebook's loop."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            outputs = model(images)
            _, predicted = torch.max(outputs.data, 1)
            total += labels.size(0)
            correct += (predicted == labels).sum().item()
    return 100 * correct / total, total


def evaluate_with_latency(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, list[float]]:
    """Accuracy and per-batch seconds: ``time.time()`` around copy + forward + argmax + count,
    no synchronisation (on a GPU this times the launch, not the work)."""
    model.eval()
    correct = total = 0
    latencies = []
    with torch.no_grad():
        for images, labels in loader:
            start = time.time()
            images, labels = images.to(device), labels.to(device)
            outputs = model(images)
            _, predicted = torch.max(outputs.data, 1)
            total += labels.size(0)
            correct += (predicted == labels).sum().item()
            latencies.append(time.time() - start)
    return 100 * correct / total, latencies


def search(
    arch: str,
    weights_path: str,
    val_set: Dataset,
    device: torch.device,
    grid: Sequence[float] = COARSE_GRID,
    step: float = 0.01,
    tolerance: float = 1.0,
    rule: str = "contiguous",
    batch_size: int = 128,
    num_workers: int = 2,
) -> dict:
    """The notebook's whole search, from the saved state_dict to the chosen ratio."""
    timer: dict[str, float] = {}
    loader = val_loader(val_set, batch_size, num_workers)
    images = 0

    eval_calls: list[float] = []

    def timed_eval(model: nn.Module) -> float:
        nonlocal images
        t0 = time.perf_counter()
        acc, n = evaluate(model, loader, device)
        eval_calls.append(time.perf_counter() - t0)
        timer["evaluate"] = timer.get("evaluate", 0.0) + eval_calls[-1]
        images += n
        return acc

    def timed_prune(model: nn.Module, ratio: float) -> nn.Module:
        t0 = time.perf_counter()
        prune_layerwise(model, ratio)
        timer["prune"] = timer.get("prune", 0.0) + time.perf_counter() - t0
        return model

    model = fresh_model(arch, weights_path, device, timer)
    dense_acc = timed_eval(model)
    del model

    # Coarse: prune every ratio, keep every pruned model, then evaluate them all.
    pruned_models = {}
    for ratio in grid:
        pruned_models[ratio] = timed_prune(fresh_model(arch, weights_path, device, timer), ratio)
    curve: dict[float, float] = {}
    for ratio, model in pruned_models.items():
        curve[ratio] = timed_eval(model)
    del pruned_models, model

    coarse = [(r, passes(a, dense_acc, tolerance)) for r, a in curve.items()]
    span = refinement_span(coarse, rule)
    refine = refinement_grid(*span, step) if span else []
    for ratio in refine:
        model = timed_prune(fresh_model(arch, weights_path, device, timer), ratio)
        curve[ratio] = timed_eval(model)
    verdicts = [(round(r, 6), passes(a, dense_acc, tolerance)) for r, a in curve.items()]
    return {
        "dense_acc": dense_acc,
        "threshold": dense_acc - tolerance,
        "tolerance": tolerance,
        "rule": rule,
        "best_ratio": answer(verdicts, rule),
        "best_ratio_contiguous": answer(verdicts, "contiguous"),
        "best_ratio_highest": answer(verdicts, "highest"),
        "refine_span": list(span) if span else None,
        "candidates": len(curve),
        "images": images,
        "curve": [{"ratio": round(r, 6), "val_acc": a, "passed": passes(a, dense_acc, tolerance)}
                  for r, a in sorted(curve.items())],
        "breakdown_s": timer,
        "evaluate_calls_s": eval_calls,
    }


def latency(arch: str, weights_path: str, val_set: Dataset, device: torch.device,
            batch_size: int = 128, num_workers: int = 2) -> dict:
    """The notebook's dense-model latency over the validation loader, in milliseconds."""
    model = fresh_model(arch, weights_path, device)
    acc, seconds = evaluate_with_latency(model, val_loader(val_set, batch_size, num_workers), device)
    p50, p90 = p50_p90(seconds)
    return {"p50_ms": p50 * 1000.0, "p90_ms": p90 * 1000.0, "batches": len(seconds), "val_acc": acc,
            "method": "time.time() per validation batch, copy + forward + argmax, no sync"}


def finetune_throughput(arch: str, weights_path: str, train_set: Dataset, device: torch.device,
                        warmup: int = 2, batches: int = 8, batch_size: int = 128, num_workers: int = 2,
                        lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4) -> dict:
    """Images per second of the notebook's training loop over ``batches`` batches after ``warmup``
    (loader waits included, as the loop pays them)."""
    model = fresh_model(arch, weights_path, device)
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=num_workers)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    model.train()
    running_loss = 0.0
    seen = 0
    t0 = None
    for i, (inputs, labels) in enumerate(loader):
        inputs, labels = inputs.to(device), labels.to(device)
        optimizer.zero_grad()
        outputs = model(inputs)
        loss = criterion(outputs, labels)
        loss.backward()
        optimizer.step()
        running_loss += loss.item()  # the notebook's per-batch .item() (a device sync)
        if i == warmup - 1:
            t0 = time.perf_counter()
        elif i >= warmup:
            seen += labels.size(0)
        if i == warmup + batches - 1:
            break
    if t0 is None or seen == 0:
        raise RuntimeError(f"training split too small for {warmup} + {batches} batches of {batch_size}")
    seconds = time.perf_counter() - t0
    return {"images_per_s": seen / seconds, "images": seen, "seconds": seconds, "warmup_batches": warmup}


def train_epochs(arch: str, train_set: Dataset, val_set: Dataset, device: torch.device, epochs: int,
                 batch_size: int = 128, num_workers: int = 2, lr: float = 0.01, momentum: float = 0.9,
                 weight_decay: float = 5e-4) -> dict:
    """The notebook's fine-tune cell as it runs: per epoch its training loop (a loss ``.item()`` per
    batch) then its validation loop, then one ``torch.save`` at the end. Returns the wall time of
    each epoch (training + validation, from the epoch's first loader fetch; the last epoch's
    includes the save, as prunelab's last epoch includes its final checkpoint) and of the save."""
    model = build_model(arch).to(device)
    trainloader = DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=num_workers)
    valloader = val_loader(val_set, batch_size, num_workers)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    epoch_s, images = [], 0
    for _ in range(epochs):
        t0 = time.perf_counter()
        model.train()
        running_loss = 0.0
        for inputs, labels in trainloader:
            inputs, labels = inputs.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = criterion(model(inputs), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            images += labels.size(0)
        evaluate(model, valloader, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_s.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(model.state_dict(), Path(tmp) / "vgg16_cifar10.pth")
    save_s = time.perf_counter() - t0
    epoch_s[-1] += save_s
    return {"epoch_s": epoch_s, "save_s": save_s, "train_images": images}
