"""``latency.runtime=auto``: the runtime this device serves the dense model fastest in.

``pick`` builds the dense model's served form in every runtime of ``latency.auto_runtimes`` that
is installed and usable here, checks each one's answers (a form that disagrees is refused, not
timed), times them all briefly in turns at ``latency.batch_size`` (``latency.auto_iters`` rounds,
the order rotating; each form is handed float32 NCHW images and does its own cast, as a server
would), and returns the spec with the fastest p50 as its runtime, with a record of every
runtime's figure and why the winner won. The candidates are then timed in that runtime as usual.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from prunelab.deploy import registry
from prunelab.deploy.checks import DeployMismatchError, check_every_size
from prunelab.deploy.spec import DeploySpec
from prunelab.errors import ConfigError
from prunelab.latency import summarize, time_interleaved

log = logging.getLogger("prunelab")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def pick(dense_net: nn.Module, batch: torch.Tensor, spec: DeploySpec, device,
         check_images: torch.Tensor | None = None) -> tuple[DeploySpec, dict]:
    """(the spec with ``runtime`` set to the fastest usable runtime, the record for the report)."""
    device = torch.device(device)
    usable, skipped = registry.usable(spec.hardware, spec.auto_runtimes)
    forms, refused, described = {}, {}, {}
    for name, runtime in usable.items():
        trial = dataclasses.replace(spec, runtime=name)
        try:
            form = runtime.build(dense_net, trial, device=device, example_batch=batch,
                                 channels_last=False if name == "eager" else spec.channels_last)
            form.warm(batch)
            check_every_size(dense_net, form, check_images, {int(batch.shape[0]): batch}, device,
                             what=f"dense {name} form")
        except DeployMismatchError as exc:
            refused[name] = str(exc)
            log.warning("latency.runtime=auto: %s refused: %s", name, exc)
            continue
        except Exception as exc:  # a runtime that cannot serve this model is left out, and the report says why
            refused[name] = f"could not serve this model: {_first_line(exc)}"
            log.warning("latency.runtime=auto: %s left out: %s", name, refused[name])
            continue
        forms[name] = form
    if not forms:
        raise ConfigError("latency.runtime=auto found no runtime that serves this model here ("
                          + "; ".join(f"{k}: {v}" for k, v in {**skipped, **refused}.items())
                          + "); set latency.runtime to one that works")
    bs = int(batch.shape[0])
    samples = time_interleaved(forms, batch, device, min(spec.warmup, 3), spec.auto_iters, False, None, rotate=True)
    figures = {}
    for name, form in forms.items():
        d = form.describe()
        described[name] = d
        st = summarize(samples[name], bs)
        figures[name] = {"p50_ms": st["p50"], "p90_ms": st["p90"], "dtype": d["dtype"], "layout": d["layout"],
                         **({"library": d["library"]} if d.get("library") else {})}
    ranked = sorted(figures, key=lambda n: figures[n]["p50_ms"])
    winner = ranked[0]
    w = figures[winner]["p50_ms"]
    if len(ranked) > 1:
        second = ranked[1]
        s = figures[second]["p50_ms"]
        why = (f"{winner} served the dense model fastest at batch {bs}: p50 {w:.2f} ms against {second}'s "
               f"{s:.2f} ms ({s / w:.2f}x), the runtimes timed in turns over {spec.auto_iters} rounds")
    else:
        why = f"{winner} was the only runtime usable here (p50 {w:.2f} ms at batch {bs})"
    record = {"requested": "auto", "chosen": winner, "why": why, "batch_size": bs, "iters": spec.auto_iters,
              "figures": {n: figures[n] for n in ranked}, "skipped": skipped, "refused": refused,
              "timed_from": "float32 NCHW images, each runtime casting them itself"}
    log.info("latency.runtime=auto -> %s (%s)", winner, why)
    return spec.with_runtime(winner), record
