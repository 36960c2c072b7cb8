"""How a pruned model is timed: the way it will really run.

``time_dense_and_pruned`` times the dense and the pruned model in turns, in the same runtime
(``latency.runtime``, one of ``prunelab.deploy.registry.RUNTIMES``; ``auto`` is decided before by
``prunelab.deploy.auto.pick``), dtype and layout, for every method, after checking every form's
answers against the eager fp32 model at every timed batch size (``prunelab.deploy.checks``).
By the kernels the method's registry entry names (``prunelab.pruning.registry``):

- dense kernels on a dense tensor with zeros (magnitude): no speedup expected, and the result gives
  the noise of its own timing so a ratio within it is never read as a speedup;
- a smaller dense network (channel): timed as it is;
- 2:4 (semi_structured, and chains ending in it): the 2:4 Linear layers on PyTorch's sparse kernels
  (deploy runtime, CUDA sm80+, fp16/bf16) against the dense form in the same dtype; masked-dense
  elsewhere, and the result says so.

``ship_to`` writes the pruned form in its runtime's own format (``prunelab.deploy.ship``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from prunelab.deploy import registry
from prunelab.deploy.checks import check_every_size
from prunelab.deploy.spec import DeploySpec, as_spec
from prunelab.hardware import detect
from prunelab.latency import paired_stats, summarize, time_interleaved
from prunelab.pruning import registry as methods

log = logging.getLogger(__name__)

MAGNITUDE_NOTE = "unstructured zeros: no speedup expected; the measured ratio is noise"
TWO_FOUR_SLOW = ("2:4 sparse kernels pay on large Linear layers at large batches (and never touch the "
                 "convolutions); here they ran slower than the dense form")
EAGER_TWO_FOUR = "latency.runtime=eager: the 2:4 weights ran masked-dense (dense kernels on zeros)"


def spec_for(latency_cfg, device, precision: str | None = None) -> DeploySpec:
    """The resolved spec (a caller's plain config resolved for ``device``'s hardware)."""
    return as_spec(latency_cfg, detect(device), precision)


def build_forms(nets: dict, two_four: set[str], batches, head, device, spec: DeploySpec, channels_last):
    """({tag: form}, runtime facts, notes), one form per network in ``nets``, all in ``spec``'s
    runtime, dtype and layout; the tags in ``two_four`` have 2:4 weights (sparse kernels where they
    exist). Every batch shape is warmed (captured, compiled) before any timing."""
    if spec.runtime == registry.AUTO:
        raise ValueError("latency.runtime=auto is decided by prunelab.deploy.auto.pick before timing")
    runtime = registry.require(spec.runtime, spec.hardware)
    notes: list[str] = [] if spec.runtime == "eager" else list(spec.warnings)
    forms = {tag: runtime.build(net, spec, device=device, example_batch=batches[head], two_four=tag in two_four,
                                channels_last=channels_last) for tag, net in nets.items()}
    for bs in sorted(batches):  # capture/compile every shape before any timing
        for form in forms.values():
            form.warm(batches[bs])
    if len({form.use_graph for form in forms.values()}) > 1:  # one runtime for all, or the ratios mean nothing
        for form in forms.values():
            form.disable_graph("another model could not be captured; all run the same way")
    facts = {"runtime": spec.runtime, "precision": spec.precision} if spec.runtime == "eager" else \
        {"runtime": spec.runtime, "dtype_reason": spec.reasons.get("dtype")}
    return forms, facts, notes


def _images(batches: Iterable[torch.Tensor] | None) -> torch.Tensor | None:
    """The agreement images as one tensor (None: check on the timing batches)."""
    parts = list(batches) if batches is not None else []
    return torch.cat(parts) if parts else None


def _by_size(results: dict, head: int) -> dict:
    """The headline batch size's agreement, with every checked size's figures under ``by_batch_size``."""
    keys = ("images", "agreement", "flips_beyond_rounding", "max_rel_logit_diff", "rms_rel_logit_error", "logit_scale")
    return dict(results[head], by_batch_size={str(bs): {k: r[k] for k in keys} for bs, r in results.items()})


def _kernels(forms: dict, tag: str, runtime: str) -> str | None:
    """What ran a 2:4 model's sparse layers (sparse kernels, or masked-dense and why)."""
    return EAGER_TWO_FOUR if runtime == "eager" else forms[tag].kernels


def time_dense_and_pruned(dense_net: nn.Module, pruned_net: nn.Module | None, method: str | None,
                          batches: Mapping[int, torch.Tensor], device, latency_cfg, loggers=(), *,
                          precision: str | None = None, channels_last: bool | None = None,
                          check: bool = True, agreement_batches: Iterable[torch.Tensor] | None = None,
                          ship_to: Path | None = None) -> dict:
    """Dense and pruned latency, timed in turns in one runtime, per batch size; see the module doc.

    ``batches``: {batch size: images} (``prunelab.latency.latency_batches``), including
    ``latency.batch_size``, whose speedup is the headline. ``pruned_net=None`` times the dense
    model alone (no pruning stage). ``latency_cfg``: a resolved :class:`DeploySpec` (a plain config
    is resolved for ``device``). ``precision``: the trainer's, used by ``latency.runtime=eager``
    only. ``channels_last``: the layout both run in (None: the spec's deploy layout; the eager
    runtime's is NCHW unless told). ``check``: raise ``DeployMismatchError`` when a form changes
    top-1 answers beyond rounding or its logits beyond its dtype's tolerance, at any timed batch
    size, on ``agreement_batches`` (the pipeline passes ``latency.agreement_images`` validation
    images), else on the timing batches. ``ship_to``: a folder where the pruned form (the dense one
    without a pruned model) is written in its runtime's format as ``pruned``/``dense``. Logs
    ``latency/{dense,pruned}/{p50,p90,p99}_ms`` (the headline batch size; others as
    ``latency/<tag>/bs<N>/...``) and ``latency/speedup_p50``.
    """
    if dense_net is pruned_net:
        raise ValueError("dense_net and pruned_net are the same module (pruned in place): pass the dense weights "
                         "as a separate module, e.g. one built from models/dense.pt")
    device = torch.device(device)
    spec = spec_for(latency_cfg, device, precision)
    head = spec.batch_size
    if head not in batches:
        raise ValueError(f"batches must include latency.batch_size={head}, got batch sizes {sorted(batches)}")
    hw = spec.hardware
    if channels_last is None:
        channels_last = _layout(spec)
    nets = {"dense": dense_net} if pruned_net is None else {"dense": dense_net, "pruned": pruned_net}
    two_four = {"pruned"} if methods.two_four(method) and pruned_net is not None else set()
    forms, facts, notes = build_forms(nets, two_four, batches, head, device, spec, channels_last)
    kernels = _kernels(forms, "pruned", facts["runtime"]) if two_four else None
    checked = None
    if check:
        # At every timed batch size, in batches of exactly that size: the shapes already
        # captured/compiled, so checking compiles nothing new for one form and not another.
        images = _images(agreement_batches)
        checked = {tag: _by_size(check_every_size(nets[tag], form, images, batches, device,
                                                  what=f"{tag} {spec.runtime} form"), head)
                   for tag, form in forms.items()}

    transfer = spec.include_transfer
    per = _time_every_size(forms, batches, device, spec)
    _log(per, head, loggers)

    desc = _describe(forms, facts, hw, transfer)
    facts.update(spec=spec.to_dict(), folded={t: x["folded"] for t, x in desc.items()}, compile=desc["dense"]["compile"],
                 compile_s={t: x["compile_s"] for t, x in desc.items()}, batch_sizes=sorted(batches))
    for tag, x in desc.items():
        notes += [f"{tag}: {n}" for n in x["notes"]]
    h = per[head]
    result = {"method": method, "batch_size": head, "dense": h["dense"], "pruned": h.get("pruned"),
              "by_batch_size": {str(bs): r for bs, r in per.items()}, "runtime": facts, "kernels": kernels,
              "agreement": checked, "notes": notes}
    if ship_to is not None:
        from prunelab.deploy.ship import ship

        tag = "dense" if pruned_net is None else "pruned"
        result["shipped"] = ship(forms[tag], spec, Path(ship_to), tag)
    if pruned_net is None:
        return result
    _speedup(result, h, method, notes)
    if kernels:
        notes.insert(0, kernels)
    if kernels and getattr(forms["pruned"], "sparse", False) and h["speedup_p50"] < 1.0:
        notes.append(f"{TWO_FOUR_SLOW} ({h['speedup_p50']:.2f}x at batch {head}).")
    return result


def _time_every_size(forms: dict, batches: Mapping[int, torch.Tensor], device, spec: DeploySpec) -> dict:
    """{batch size: stats per form (paired with the dense one where there is a pruned one)}, the forms
    taking turns at each size."""
    transfer, per = spec.include_transfer, {}
    for bs in sorted(batches):
        # Cast once up front unless the copy is to be timed: the forms share dtype and layout.
        x = batches[bs] if transfer else forms["dense"].prepare(batches[bs])
        samples = time_interleaved(forms, x, device, spec.warmup, spec.iters, transfer, None)
        if "pruned" not in forms:
            per[bs] = {"dense": summarize(samples["dense"], bs)}
        else:
            per[bs] = paired_stats(samples["dense"], samples["pruned"], bs)
        for tag in forms:
            per[bs][tag].update(include_transfer=transfer, interleaved_with=sorted(set(forms) - {tag}))
    return per


def _speedup(result: dict, h: dict, method: str | None, notes: list[str]) -> None:
    """The headline speedup with its paired interval; for a method on the dense kernels, the noise
    of this very timing instead (and a note saying a ratio off 1 is drift, not a speedup)."""
    ratio = h["paired_ratio"]
    result.update(speedup_p50=h["speedup_p50"], speedup_paired_5_95=[ratio["p5"], ratio["p95"]],
                  speedup_beyond_noise=_beyond_noise(method, ratio))
    if not methods.dense_kernels(method):
        return
    within = ratio["p5"] <= 1.0 <= ratio["p95"]
    result["noise"] = {"ratio_of_p50s": h["speedup_p50"], "paired_ratio_p50": ratio["p50"],
                       "paired_ratio_5_95": [ratio["p5"], ratio["p95"]], "within_noise": within}
    note = (f"{MAGNITUDE_NOTE} (dense/pruned p50 {h['speedup_p50']:.3f}; per-iteration paired ratio p50 "
            f"{ratio['p50']:.3f}, 5-95% {ratio['p5']:.3f}-{ratio['p95']:.3f})")
    if not within:
        note += ("; the interval misses 1, yet both ran the same dense kernels on the same shapes: "
                 "that is drift in the machine during timing, not a speedup")
    notes.insert(0, note)


def time_together(dense_net: nn.Module, candidates: Mapping[str, tuple[nn.Module, str]], batch: torch.Tensor,
                  device, latency_cfg, *, precision: str | None = None, channels_last: bool | None = None) -> dict:
    """The dense model and several candidates, every one timed in turns with all the others in one
    session, at ``batch``'s size: the final round of a latency search. Candidates each timed in
    their own session against their own dense timing can be reordered by a drift in the machine
    between sessions; here every iteration runs them all back to back, so their p50s compare.

    ``candidates``: {name: (network, method)} (the method says which run 2:4 kernels). The
    order rotates every iteration, so no model always runs right after the same one.
    Returns {"models": {"dense": stats, name: stats + speedup_p50 + paired_ratio +
    speedup_beyond_noise}, "samples": {name: ms per iteration}, "runtime": facts, "notes": [...],
    "batch_size", "iters"}.
    """
    if not candidates or "dense" in candidates:
        raise ValueError("time_together needs at least one candidate, none of them named 'dense'")
    if any(net is dense_net for net, _ in candidates.values()):
        raise ValueError("a candidate is the dense module itself (pruned in place): pass a separate dense copy")
    device, bs = torch.device(device), int(batch.shape[0])
    spec = spec_for(latency_cfg, device, precision)
    hw = spec.hardware
    if channels_last is None:
        channels_last = _layout(spec)
    nets = {"dense": dense_net, **{name: net for name, (net, _) in candidates.items()}}
    two_four = {name for name, (_, method) in candidates.items() if methods.two_four(method)}
    forms, facts, notes = build_forms(nets, two_four, {bs: batch}, bs, device, spec, channels_last)
    warmup, iters, transfer = spec.warmup, spec.iters, spec.include_transfer
    x = batch if transfer else forms["dense"].prepare(batch)
    samples = time_interleaved(forms, x, device, warmup, iters, transfer, None, rotate=True)
    models = {"dense": summarize(samples["dense"], bs)}
    for name, (_, method) in candidates.items():
        st = paired_stats(samples["dense"], samples[name], bs)
        models[name] = dict(st["pruned"], speedup_p50=st["speedup_p50"], paired_ratio=st["paired_ratio"],
                            speedup_beyond_noise=_beyond_noise(method, st["paired_ratio"]))
        if name in two_four:
            models[name]["kernels"] = _kernels(forms, name, facts["runtime"])
    _describe(forms, facts, hw, transfer)
    return {"models": models, "samples": samples, "runtime": facts, "notes": notes, "batch_size": bs, "iters": iters}


def _beyond_noise(method: str | None, paired_ratio: dict) -> bool:
    """A speedup is claimed only where even the slow end (5th percentile) of the per-iteration
    paired ratios beats 1, and never for a method that runs the dense kernels (unstructured zeros)."""
    return not methods.dense_kernels(method) and paired_ratio["p5"] > 1.0


def _describe(forms: dict, facts: dict, hw, transfer: bool) -> dict:
    """Adds what every timing reports of its runtime to ``facts``; returns each form's description."""
    desc = {tag: form.describe() for tag, form in forms.items()}
    d = desc["dense"]
    facts.update(dtype=d["dtype"], layout=d["layout"], graph=all(x["graph"] for x in desc.values()),
                 fused_conv_relu=all(x.get("fused_conv_relu") for x in desc.values()),
                 device=hw.name, device_kind=hw.kind, hardware=hw.describe(), include_transfer=transfer)
    return desc


def _layout(spec: DeploySpec) -> bool:
    """The layout the forms run in when the caller does not say: the spec's deploy layout; the
    eager runtime times the model as trained (NCHW unless told)."""
    return False if spec.runtime == "eager" else spec.channels_last


def _log(per: dict, head: int, loggers) -> None:
    metrics = {}
    for bs, r in per.items():
        sub = "" if bs == head else f"bs{bs}/"
        for tag in ("dense", "pruned"):
            if tag in r:
                metrics.update({f"latency/{tag}/{sub}{q}_ms": r[tag][q] for q in ("p50", "p90", "p99")})
    if "speedup_p50" in per[head]:
        metrics["latency/speedup_p50"] = per[head]["speedup_p50"]
    for lg in loggers:
        lg.log_metrics(metrics, step=0)
