"""Timing as a run does it, for the pipeline and ``callbacks.LatencyCallback`` alike.

``open_session`` takes the resolved ``DeploySpec``: the timing batches (the spec's batch sizes, the
first images of the test split), the agreement images (the first ``latency.agreement_images`` of
the validation split), and ``latency.runtime=auto`` decided on the dense model (``auto.pick``).
The :class:`TimingSession` it returns times dense and pruned in turns in that runtime
(``timing.time_dense_and_pruned``), checking the served forms' answers first, or a latency
search's shortlist all together (``timing.time_together``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from prunelab.deploy.registry import AUTO
from prunelab.deploy.spec import DeploySpec
from prunelab.latency import latency_batches
from prunelab.pruning import registry


def agreement_images(dataset, images: int) -> list[torch.Tensor] | None:
    """The first ``images`` images of ``dataset``, what the served forms' answers are checked on
    (regrouped into each timed batch size); None for 0 or no split: the timing batches are."""
    if dataset is None:
        return None
    n = min(int(images), len(dataset))
    return [torch.stack([dataset[i][0] for i in range(n)])] if n > 0 else None


@dataclass
class TimingSession:
    """Where and how a run's models are timed: ``spec`` has its runtime decided (never auto)."""

    spec: DeploySpec
    batches: dict[int, torch.Tensor]
    device: torch.device
    precision: str | None
    channels_last: bool  # the training layout: the eager runtime times the model as trained
    check_batches: list[torch.Tensor] | None = None
    loggers: tuple = ()
    ship_to: Path | None = None  # where the final timing writes the timed model in its runtime's format
    runtime_choice: dict | None = None  # auto's record, where auto chose the runtime
    _dense_alone: dict = field(default_factory=dict, repr=False)

    @property
    def layout(self) -> bool | None:
        """The layout forms are timed in: served runtimes use the spec's deploy layout (None)."""
        return self.channels_last if self.spec.runtime == "eager" else None

    def time(self, dense: nn.Module, pruned: nn.Module | None, method: str | None, sizes=None, final: bool = True,
             head: int | None = None) -> dict:
        """Dense and pruned in turns at ``sizes`` (default: every batch size). ``final``: the run's
        record (answers checked, logged, the timed model shipped); else a candidate's screening.
        ``head``: the batch size that leads when ``sizes`` leave the headline one out (a latency
        search's final round measured it); nothing is then logged."""
        from prunelab.deploy.timing import time_dense_and_pruned

        chosen = self.batches if sizes is None else {b: self.batches[b] for b in sizes}
        spec = self.spec if head is None else dataclasses.replace(self.spec, batch_size=head)
        return time_dense_and_pruned(dense, pruned, method, chosen, self.device, spec,
                                     self.loggers if final and head is None else (), precision=self.precision,
                                     channels_last=self.layout, check=final, agreement_batches=self.check_batches,
                                     ship_to=self.ship_to if final else None)

    def dense_alone(self, dense: nn.Module) -> dict:
        """The dense model's own screening timing at the headline batch size, timed once."""
        if not self._dense_alone:
            self._dense_alone.update(self.time(dense, None, None, sizes=[self.spec.batch_size], final=False)["dense"])
        return self._dense_alone

    def screen(self, dense: nn.Module, candidate: nn.Module, method: str) -> dict:
        """A search candidate timed in turns with the dense model at the headline batch size. A
        candidate that runs the dense kernels here (unstructured zeros; 2:4 off CUDA) is not timed:
        it is as fast as the dense model, and timing it would only let noise rank it."""
        if not registry.speeds_up(method, self.device.type):
            d = self.dense_alone(dense)
            return {"p50_ms": d["p50"], "p90_ms": d["p90"], "dense_p50_ms": d["p50"], "speedup": 1.0,
                    "speedup_beyond_noise": False, "timed": "as dense (same kernels here)"}
        r = self.time(dense, candidate, method, sizes=[self.spec.batch_size], final=False)
        return {"p50_ms": r["pruned"]["p50"], "p90_ms": r["pruned"]["p90"], "dense_p50_ms": r["dense"]["p50"],
                "cv": max(r["pruned"]["cv"], r["dense"]["cv"]),
                "speedup": r["speedup_p50"], "speedup_beyond_noise": bool(r["speedup_beyond_noise"]),
                "timed": "in turns with dense"}

    def final(self, dense: nn.Module, pruned: nn.Module | None, method: str, search: dict | None) -> dict:
        """Dense and pruned in turns at every batch size, except where a latency search's final round
        already timed the chosen model in turns with the dense model: then the headline batch size's
        figures are the final round's (one number per model) and only the other sizes are timed here
        (with the served forms' answers checked); with no other size, all are timed and the headline
        size's figures replaced."""
        chosen = _measured_in_final_round(search) if pruned is not None else None
        if chosen is None:
            return self.time(dense, pruned, method)
        head, sizes = self.spec.batch_size, sorted(self.batches)
        rest = [b for b in sizes if b != head]
        # (``head`` given: timed with the answers checked, nothing logged; the final round's figures are)
        lat = self.time(dense, pruned, method, sizes=rest or None, head=max(rest) if rest else head)
        fr, final = chosen["final_round"], search["final_round"]
        d, q, pr = dict(final["dense"]), dict(fr["stats"]), dict(fr["paired_ratio"])
        lat = dict(lat, batch_size=head, dense=d, pruned=q, speedup_p50=fr["speedup"],
                   speedup_paired_5_95=[pr["p5"], pr["p95"]], speedup_beyond_noise=fr["speedup_beyond_noise"],
                   measured_in="final round of the search")
        by = dict(lat["by_batch_size"], **{str(head): {"dense": d, "pruned": q, "speedup_p50": fr["speedup"],
                                                       "paired_ratio": pr}})
        lat["by_batch_size"] = {str(b): by[str(b)] for b in sizes}
        for lg in self.loggers:
            lg.log_metrics({**{f"latency/{tag}/{k}_ms": st[k] for tag, st in (("dense", d), ("pruned", q))
                               for k in ("p50", "p90", "p99")}, "latency/speedup_p50": fr["speedup"]}, step=0)
        return lat

    def together(self, dense: nn.Module, candidates: dict[str, tuple[nn.Module, str]]) -> dict:
        """A latency search's shortlist ({name: (network, method)}) all in turns with the dense model."""
        from prunelab.deploy.timing import time_together

        return time_together(dense, candidates, self.batches[self.spec.batch_size], self.device, self.spec,
                             precision=self.precision, channels_last=self.layout)


def _measured_in_final_round(search: dict | None) -> dict | None:
    """The chosen candidate of a latency search when the final round timed it: its speedup there is
    the one the report quotes."""
    chosen = (search or {}).get("chosen")
    return chosen if chosen and chosen.get("final_round") and (search or {}).get("final_round") else None


def open_session(spec: DeploySpec, dense: nn.Module, test_set, val_set, device, precision: str | None,
                 channels_last: bool, loggers=(), ship_to: Path | None = None) -> TimingSession:
    """The session a run times in; see the module docstring. Picking ``auto`` times the dense model."""
    device = torch.device(device)
    batches = latency_batches(test_set, spec.batch_sizes)
    checks = agreement_images(val_set, spec.agreement_images)
    choice = None
    if spec.runtime == AUTO:  # the fastest runtime for the dense model, measured here
        from prunelab.deploy.auto import pick

        spec, choice = pick(dense, batches[spec.batch_size], spec, device, torch.cat(checks) if checks else None)
    return TimingSession(spec, batches, device, precision, bool(channels_last), checks, tuple(loggers), ship_to,
                         choice)
