"""First-order Taylor importance of conv filters, and the calibration images it is measured on.

Removing filter f changes the loss by about ``(sum over f's weights and bias of w * dL/dw)`` (a
first-order expansion around the trained weights); its square, summed over a few training batches,
scores how much the network leans on that filter. Unlike a weight norm it sees the data: a filter
with large weights whose output the next layers ignore scores low, and a small filter they rely on
scores high. Zeroed filters of a conv without BatchNorm after it score exactly zero (``w * g = 0``).
Only the conv's own weights and bias count: behind a BatchNorm, whose shift still feeds the next
layer when the filter is zero, the score is of the filter, not of the whole channel.

The batches are the training split's first images, unaugmented, in the split's order: never the
validation images the search judges candidates on. They are drawn on first use, and the scores of
a network are computed once per job (keyed by a digest of its weights): gradients summed in another
memory layout or thread order differ in their last bits, and a near-tie must not rank one way for
the candidate a search evaluates and another way for the model it then saves and times.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from prunelab.io import state_digest
from prunelab.models.modes import eval_mode

Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]


class Calibration:
    """Labelled batches, held on the CPU and moved to the network's device as they are used; given,
    or drawn by ``draw()`` the first time they are needed. Keeps the Taylor scores of each network
    it has scored (``scores``)."""

    def __init__(self, batches: Batches | None = None, draw: Callable[[], Batches] | None = None):
        if (batches is None) == (draw is None):
            raise ValueError("calibration takes its batches or a way to draw them, one of the two")
        self._batches = None if batches is None else self._checked(batches)
        self._draw = draw
        self._scores: dict[tuple[str, tuple[str, ...]], dict[str, torch.Tensor]] = {}

    @staticmethod
    def _checked(batches: Batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if not batches:
            raise ValueError("calibration needs at least one batch of training images")
        return [(x.detach().cpu(), y.detach().cpu()) for x, y in batches]

    @property
    def batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._batches is None:
            self._batches = self._checked(self._draw())
        return self._batches

    @property
    def images(self) -> int:
        return sum(len(y) for _, y in self.batches)

    def identity(self) -> dict:
        """What fixes the scores besides the weights: the images and labels (count and digest)."""
        h = hashlib.sha256()
        for x, y in self.batches:
            h.update(x.contiguous().numpy().tobytes())
            h.update(y.contiguous().numpy().tobytes())
        return {"images": self.images, "digest": h.hexdigest()[:16]}

    def scores(self, model: nn.Module, convs: Mapping[str, nn.Conv2d]) -> dict[str, torch.Tensor]:
        """``taylor_scores`` of ``model`` on these batches, computed once per set of weights."""
        key = (state_digest(model.state_dict()), tuple(convs))
        if key not in self._scores:
            self._scores[key] = agree_across_ranks(taylor_scores(model, convs, self.batches))
        return {n: s.clone() for n, s in self._scores[key].items()}

    def __repr__(self) -> str:
        drawn = f"{len(self._batches)} batches" if self._batches is not None else "not drawn yet"
        return f"Calibration({drawn})"

    @classmethod
    def from_datamodule(cls, dm, batches: int, batch_size: int | None = None) -> Calibration:
        """The first ``batches`` x ``batch_size`` training images of ``dm``, unaugmented
        (``calibration_set``, which prunelab's data modules have); another data module gives its
        training loader's first ``batches`` batches as they come. Drawn when first needed."""
        if batches < 1:
            raise ValueError(f"prune.calibration_batches must be >= 1, got {batches}")
        batch_size = batch_size or getattr(dm, "batch_size", 128)

        def draw() -> Batches:
            if hasattr(dm, "calibration_set"):
                loader = DataLoader(dm.calibration_set(batches * batch_size), batch_size=batch_size, shuffle=False)
            else:
                loader = dm.train_dataloader()
            out = []
            for x, y in loader:
                out.append((x, y))
                if len(out) == batches:
                    break
            return out

        return cls(draw=draw)


def agree_across_ranks(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Under DDP, rank 0's scores on every rank (GPU backward kernels need not be deterministic, and
    ranks that ranked differently would prune to different networks); unchanged otherwise."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return scores
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    out = {}
    for name, s in scores.items():
        t = s.to(device)
        dist.broadcast(t, src=0)
        out[name] = t.cpu()
    return out


def taylor_scores(model: nn.Module, convs: Mapping[str, nn.Module],
                  batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per conv in ``convs`` (modules of ``model``; a Linear's units count as filters), each output filter's squared first-order
    Taylor term summed over ``batches``: ``sum_b (sum_f w * dL_b/dw)^2``, bias included.

    Measured in eval mode (no dropout: the scores are the pruned network's), in fp32, with the
    network's ``requires_grad`` flags and gradients left as they were.
    """
    device = next(model.parameters()).device
    scores = {n: torch.zeros(c.weight.shape[0], dtype=torch.float64) for n, c in convs.items()}
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
                    g = (c.weight.grad * c.weight).flatten(1).sum(1)  # per filter, or per Linear unit
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
    ``dm``'s training split, drawn when a ranking first needs them); unchanged for the others."""
    out = dict(options)
    if out.get("importance") != "taylor" or out.get("calibration") is not None:
        return out
    if calibration is None:
        if dm is None:
            raise ValueError("prune.importance=taylor needs training images: give the pruning a data module")
        calibration = Calibration.from_datamodule(dm, int(out.get("calibration_batches", 8)))
    out["calibration"] = calibration
    return out


def journal_options(options: Mapping) -> dict:
    """``options`` as a search journal's identity holds them: JSON, and only what changes a
    verdict (the calibration images' count and digest under a Taylor ranking, nothing otherwise)."""
    out = {k: v for k, v in options.items() if k not in ("calibration", "calibration_batches")}
    cal = options.get("calibration")
    if options.get("importance") == "taylor" and cal is not None:
        out["calibration"] = cal.identity()
    return out
