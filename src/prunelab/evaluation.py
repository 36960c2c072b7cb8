"""Counting correct predictions over a split, with an optional error budget.

Plain inference-mode loops rather than ``Trainer.validate``: a search candidate must be able to
stop as soon as its mistakes exceed the budget, and the counts must be exact (no padded
distributed sampler). Under torch.distributed each rank takes a disjoint slice of the split and
the counts are summed across ranks.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from prunelab.models.modes import eval_mode


@dataclass
class Count:
    correct: int
    seen: int
    total: int
    stopped: bool
    # Per-image correctness in the loader's order (``record=True``, one process): what paired
    # statistics compare between two models judged on the same images.
    hits: torch.Tensor | None = None

    @property
    def acc(self) -> float:
        return 100.0 * self.correct / self.total if self.total else 0.0


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_loader(dataset: Dataset, batch_size: int, num_workers: int = 0) -> tuple[DataLoader, int]:
    """This rank's disjoint slice of ``dataset`` as a loader, and the size of the whole split."""
    rank, world = _distributed()
    part = dataset if world == 1 else Subset(dataset, list(range(rank, len(dataset), world)))
    loader = DataLoader(part, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        persistent_workers=num_workers > 0)
    return loader, len(dataset)


def autocast_for(device: torch.device, precision: str | None):
    if precision and "bf16" in str(precision):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision and "16" in str(precision) and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


@torch.inference_mode()
def count_correct(
    model: nn.Module,
    loader: DataLoader,
    total: int | None = None,
    max_errors: int | None = None,
    device: torch.device | str | None = None,
    precision: str | None = None,
    batch_transform=None,
    record: bool = False,
) -> Count:
    """Correct predictions of ``model`` over ``loader``; stops once errors exceed ``max_errors``.
    ``record=True`` also returns each image's correctness (``Count.hits``) when in one process."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    rank, world = _distributed()
    total = total if total is not None else len(loader.dataset)
    correct = seen = 0
    stopped = False
    sync_each_batch = world > 1 and max_errors is not None
    # Every rank must run the same number of all_reduce calls, so all loop over the largest
    # shard's batch count and a rank whose shard is exhausted contributes zeros.
    steps = math.ceil(math.ceil(total / world) / loader.batch_size) if world > 1 else None
    batches = iter(loader)
    hits: list[torch.Tensor] | None = [] if record and world == 1 else None
    with eval_mode(model), autocast_for(device, precision):
        step = 0
        while steps is None or step < steps:
            step += 1
            item = next(batches, None)
            if item is None and steps is None:
                break
            c = s = 0
            if item is not None:
                x, y = item[0].to(device, non_blocking=True), item[1].to(device, non_blocking=True)
                if batch_transform is not None:
                    x = batch_transform(x)
                right = model(x).argmax(dim=1) == y
                c, s = int(right.sum()), int(y.numel())
                if hits is not None:
                    hits.append(right.cpu())
            if sync_each_batch:
                t = torch.tensor([c, s], dtype=torch.long)
                dist.all_reduce(t)
                c, s = int(t[0]), int(t[1])
            correct += c
            seen += s
            if max_errors is not None and seen - correct > max_errors:
                stopped = True
                break
    if world > 1 and not sync_each_batch:
        t = torch.tensor([correct, seen], dtype=torch.long)
        dist.all_reduce(t)
        correct, seen = int(t[0]), int(t[1])
    return Count(correct, seen, total, stopped, torch.cat(hits) if hits else None)
