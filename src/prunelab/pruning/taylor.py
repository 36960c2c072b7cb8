"""First-order Taylor importance of conv filters, and the calibration images it is measured on.

Removing filter f changes the loss by about ``(sum over f's weights and bias of w * dL/dw)`` (a
first-order expansion around the trained weights); its square, summed over a few training batches,
scores how much the network leans on that filter. Unlike a weight norm it sees the data: a filter
with large weights whose output the next layers ignore scores low, and a small filter they rely on
scores high. Zeroed filters score exactly zero (``w * g = 0``), as a norm would score them.

The batches are the training split's first images, unaugmented, in the split's order: never the
validation images the search judges candidates on, and the same images for every candidate of a
search, so a plan is reproducible.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from prunelab.models.modes import eval_mode


class Calibration:
    """Labelled batches, held on the CPU and moved to the network's device as they are used."""

    def __init__(self, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]):
        if not batches:
            raise ValueError("calibration needs at least one batch of training images")
        self.batches = [(x.detach().cpu(), y.detach().cpu()) for x, y in batches]

    @property
    def images(self) -> int:
        return sum(len(y) for _, y in self.batches)

    def __repr__(self) -> str:
        return f"Calibration({len(self.batches)} batches, {self.images} images)"

    @classmethod
    def from_datamodule(cls, dm, batches: int, batch_size: int | None = None) -> Calibration:
        """The first ``batches`` x ``batch_size`` training images of ``dm``, unaugmented
        (``calibration_set``, which prunelab's data modules have); another data module gives its
        training loader's first ``batches`` batches as they come."""
        if batches < 1:
            raise ValueError(f"prune.calibration_batches must be >= 1, got {batches}")
        batch_size = batch_size or getattr(dm, "batch_size", 128)
        if hasattr(dm, "calibration_set"):
            ds = dm.calibration_set(batches * batch_size)
            loader = DataLoader(ds, batch_size=batch_size, shuffle=False)
        else:
            loader = dm.train_dataloader()
        out = []
        for x, y in loader:
            out.append((x, y))
            if len(out) == batches:
                break
        return cls(out)


def taylor_scores(model: nn.Module, convs: Mapping[str, nn.Conv2d],
                  batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per conv in ``convs`` (modules of ``model``), each output filter's squared first-order
    Taylor term summed over ``batches``: ``sum_b (sum_f w * dL_b/dw)^2``, bias included.

    Measured in eval mode (no dropout: the scores are the pruned network's), in fp32, with the
    network's ``requires_grad`` flags and gradients left as they were.
    """
    device = next(model.parameters()).device
    scores = {n: torch.zeros(c.out_channels, dtype=torch.float64) for n, c in convs.items()}
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        with eval_mode(model), torch.inference_mode(False), torch.enable_grad():
            for x, y in batches:
                out = model(x.to(device))
                nn.functional.cross_entropy(out.float(), y.to(device)).backward()
                for n, c in convs.items():
                    g = (c.weight.grad * c.weight).sum((1, 2, 3))
                    if c.bias is not None:
                        g = g + c.bias.grad * c.bias
                    scores[n] += g.detach().double().pow(2).cpu()
                for p in params:
                    p.grad = None
    finally:
        for p, flag, grad in zip(params, flags, grads, strict=True):
            p.requires_grad_(flag)
            p.grad = grad
    return {n: s.float() for n, s in scores.items()}


def with_calibration(options: Mapping, dm, calibration: Calibration | None = None) -> dict:
    """``options`` (``prune.*``, as ``make_pruner`` takes them) with the calibration images a
    Taylor ranking needs (``calibration``, else the first ``calibration_batches`` batches of
    ``dm``'s training split); unchanged for the other rankings."""
    out = dict(options)
    if out.get("importance") != "taylor" or out.get("calibration") is not None:
        return out
    if calibration is None:
        if dm is None:
            raise ValueError("prune.importance=taylor needs training images: give the pruning a data module")
        calibration = Calibration.from_datamodule(dm, int(out.get("calibration_batches", 8)))
    out["calibration"] = calibration
    return out
