"""How a pruned model is shipped and timed: the way it will really run.

``time_dense_and_pruned`` times the dense and the pruned model in turns, in the same runtime,
dtype and layout, for every method; the runtime is ``prunelab.runtime``'s deploy form (pool folded,
one dtype, a CUDA graph per batch size on GPU) or, with ``latency.runtime=eager``, the models as
trained under autocast. Per method:

- magnitude: dense kernels on a dense tensor with zeros: no speedup expected, and the result gives
  the noise of its own timing so a ratio within it is never read as a speedup;
- channel: the smaller dense network;
- semi_structured: the 2:4 Linear layers on PyTorch's sparse kernels (CUDA sm80+, fp16/bf16) against
  the dense form in the same dtype; masked-dense elsewhere, and the result says so;
- optionally the exported ONNX model under onnxruntime on the CPU.

Files: unstructured methods save a plain torchvision state_dict (``pruned.pt``); channel-pruned
networks save their channel counts (JSON) and weights (safetensors), loaded by
``prunelab.pruning.channel.load_channel_pruned``. The report also gives the bytes the sparse
weights take when stored compactly.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from prunelab.errors import ConfigError
from prunelab.hardware import (
    detect,
    resolve_deploy_layout,
    resolve_dtype,
    resolve_fuse,
    resolve_pack,
    resolve_winograd,
)
from prunelab.io import compressed_bytes, save_state_dict
from prunelab.latency import paired_stats, summarize, time_interleaved
from prunelab.models import packed
from prunelab.models.winograd import free_scratch
from prunelab.runtime import RUNTIMES, agreement, check_agreement, deploy_form, eager_form

log = logging.getLogger(__name__)

# Code defaults equal conf/latency/default.yaml's, for callers passing a partial config.
DEFAULTS = {"runtime": "deploy", "dtype": "auto", "channels_last": "auto", "batch_size": 128,
            "batch_sizes": [1, 128], "agreement_images": 512, "warmup": 5, "iters": 30,
            "include_transfer": False, "compile": False, "cuda_graph": True, "fuse": "auto",
            "winograd": "auto", "pack": "auto"}
MAGNITUDE_NOTE = "unstructured zeros: no speedup expected; the measured ratio is noise"
TWO_FOUR_SLOW = ("2:4 sparse kernels pay on large Linear layers at large batches (and never touch the "
                 "convolutions); here they ran slower than the dense form")


def _setting(cfg, key: str):
    value = cfg.get(key, None) if hasattr(cfg, "get") else getattr(cfg, key, None)
    return DEFAULTS[key] if value is None else value


def _fuse(cfg, hw) -> bool:
    """``latency.fuse`` for this device (``auto`` when a caller's config was not resolved)."""
    return bool(resolve_fuse(_setting(cfg, "fuse"), hw, compile=bool(_setting(cfg, "compile")),
                             runtime=str(_setting(cfg, "runtime"))).value)


def _winograd(cfg, hw, dtype: torch.dtype) -> bool:
    """``latency.winograd`` for this device and deploy dtype (``auto`` when not resolved)."""
    return bool(resolve_winograd(_setting(cfg, "winograd"), hw, dtype, runtime=str(_setting(cfg, "runtime")),
                                 compile=bool(_setting(cfg, "compile"))).value)


def _pack(cfg, hw, dtype: torch.dtype) -> bool:
    """``latency.pack`` for this device and deploy dtype (``auto`` when not resolved)."""
    return bool(resolve_pack(_setting(cfg, "pack"), hw, dtype, runtime=str(_setting(cfg, "runtime")),
                             compile=bool(_setting(cfg, "compile")), onednn=packed.available()).value)


EAGER_TWO_FOUR = "latency.runtime=eager: the 2:4 weights ran masked-dense (dense kernels on zeros)"


def _forms(nets: dict, two_four: set[str], batches, head, device, cfg, precision, channels_last, hw):
    """({tag: form}, runtime facts, notes), one form per network in ``nets``, all in one runtime,
    dtype and layout; the tags in ``two_four`` have 2:4 weights (sparse kernels where they exist)."""
    runtime = str(_setting(cfg, "runtime"))
    if runtime not in RUNTIMES:
        raise ConfigError(f"latency.runtime={runtime!r} is not one of: {', '.join(RUNTIMES)}")
    notes: list[str] = []
    if runtime == "eager":
        forms = {tag: eager_form(net, precision, channels_last) for tag, net in nets.items()}
        return forms, {"runtime": runtime, "precision": precision}, notes
    res = resolve_dtype(_setting(cfg, "dtype"), hw)
    if res.warning:
        notes.append(res.warning)
    opts = dict(dtype=res.value, channels_last=channels_last, device=device, cuda_graph=bool(_setting(cfg, "cuda_graph")),
                compile=bool(_setting(cfg, "compile")), example_batch=batches[head], fuse=_fuse(cfg, hw),
                winograd=_winograd(cfg, hw, res.value), pack=_pack(cfg, hw, res.value))
    forms = {tag: deploy_form(net, two_four=tag in two_four, **opts) for tag, net in nets.items()}
    for bs in sorted(batches):  # capture/compile every shape before any timing
        for form in forms.values():
            form.warm(batches[bs])
    if len({form.use_graph for form in forms.values()}) > 1:  # one runtime for all, or the ratios mean nothing
        for form in forms.values():
            form.disable_graph("another model could not be captured; all run the same way")
    return forms, {"runtime": runtime, "dtype_reason": res.reason}, notes


def _chunks(batches: Iterable[torch.Tensor] | None, size: int) -> list[torch.Tensor]:
    """``batches`` regrouped into batches of exactly ``size`` images (a remainder is left out)."""
    if batches is None:
        return []
    parts = list(batches)
    if not parts:
        return []
    images = torch.cat(parts)
    full = images.shape[0] // size * size
    return list(images[:full].split(size)) if full else []


def _kernels(forms: dict, tag: str, runtime: str) -> str | None:
    """What ran a 2:4 model's sparse layers (sparse kernels, or masked-dense and why)."""
    return EAGER_TWO_FOUR if runtime == "eager" else forms[tag].kernels


def time_dense_and_pruned(dense_net: nn.Module, pruned_net: nn.Module | None, method: str | None,
                          batches: Mapping[int, torch.Tensor], device, latency_cfg, loggers=(), *,
                          precision: str | None = None, channels_last: bool | None = None,
                          check: bool = True, agreement_batches: Iterable[torch.Tensor] | None = None) -> dict:
    """Dense and pruned latency, timed in turns in one runtime, per batch size; see the module doc.

    ``batches``: {batch size: images} (``prunelab.latency.latency_batches``), including
    ``latency.batch_size``, whose speedup is the headline. ``pruned_net=None`` times the dense
    model alone (no pruning stage). ``precision``: the trainer's, used by ``latency.runtime=eager``
    only. ``channels_last``: the layout both run in (None: ``latency.channels_last``, auto = the
    hardware's choice for inference). ``check``: raise
    ``DeployMismatchError`` when a deploy form changes top-1 answers beyond rounding on
    ``agreement_batches`` (the pipeline passes ``latency.agreement_images`` validation images), else
    on the headline batch. Logs ``latency/{dense,pruned}/{p50,p90,p99}_ms`` (the headline batch size; others as
    ``latency/<tag>/bs<N>/...``) and ``latency/speedup_p50``.
    """
    if dense_net is pruned_net:
        raise ValueError("dense_net and pruned_net are the same module (pruned in place): pass the dense weights "
                         "as a separate module, e.g. one built from models/dense.pt")
    device = torch.device(device)
    head = int(_setting(latency_cfg, "batch_size"))
    if head not in batches:
        raise ValueError(f"batches must include latency.batch_size={head}, got batch sizes {sorted(batches)}")
    hw = detect(device)
    if channels_last is None:
        channels_last = _layout(latency_cfg, hw)
    nets = {"dense": dense_net} if pruned_net is None else {"dense": dense_net, "pruned": pruned_net}
    two_four = {"pruned"} if method == "semi_structured" and pruned_net is not None else set()
    forms, facts, notes = _forms(nets, two_four, batches, head, device, latency_cfg, precision, channels_last, hw)
    kernels = _kernels(forms, "pruned", facts["runtime"]) if two_four else None
    checked = None
    if check and facts["runtime"] == "deploy":
        # Checked in headline-sized chunks only: the forms were captured/compiled for the timed
        # shapes, and a new shape would capture (or compile) again, for one form perhaps not the other.
        on = _chunks(agreement_batches, head) or [batches[head]]
        checked = {tag: check_agreement(agreement(nets[tag], form, on, device), what=f"{tag} deploy form")
                   for tag, form in forms.items()}

    warmup, iters = int(_setting(latency_cfg, "warmup")), int(_setting(latency_cfg, "iters"))
    transfer = bool(_setting(latency_cfg, "include_transfer"))
    per = {}
    try:
        for bs in sorted(batches):
            # Cast once up front unless the copy is to be timed: the forms share dtype and layout.
            x = batches[bs] if transfer else forms["dense"].prepare(batches[bs])
            samples = time_interleaved(forms, x, device, warmup, iters, transfer, None)
            if pruned_net is None:
                per[bs] = {"dense": summarize(samples["dense"], bs)}
            else:
                per[bs] = paired_stats(samples["dense"], samples["pruned"], bs)
            for tag in forms:
                per[bs][tag].update(include_transfer=transfer, interleaved_with=sorted(set(forms) - {tag}))
    finally:  # this thread's Winograd buffers (hundreds of MB at batch 128) are not kept past timing
        free_scratch()
    _log(per, head, loggers)

    desc = _describe(forms, facts, hw, transfer)
    facts.update(folded={t: x["folded"] for t, x in desc.items()}, compile=desc["dense"]["compile"],
                 compile_s={t: x["compile_s"] for t, x in desc.items()}, batch_sizes=sorted(batches))
    for tag, x in desc.items():
        notes += [f"{tag}: {n}" for n in x["notes"]]
    h = per[head]
    result = {"method": method, "batch_size": head, "dense": h["dense"], "pruned": h.get("pruned"),
              "by_batch_size": {str(bs): r for bs, r in per.items()}, "runtime": facts, "kernels": kernels,
              "agreement": checked, "notes": notes}
    if pruned_net is None:
        return result
    ratio = h["paired_ratio"]
    result.update(speedup_p50=h["speedup_p50"], speedup_paired_5_95=[ratio["p5"], ratio["p95"]],
                  speedup_beyond_noise=_beyond_noise(method, ratio))
    if method == "magnitude":
        within = ratio["p5"] <= 1.0 <= ratio["p95"]
        result["noise"] = {"ratio_of_p50s": h["speedup_p50"], "paired_ratio_p50": ratio["p50"],
                           "paired_ratio_5_95": [ratio["p5"], ratio["p95"]], "within_noise": within}
        note = (f"{MAGNITUDE_NOTE} (dense/pruned p50 {h['speedup_p50']:.3f}; per-iteration paired ratio p50 "
                f"{ratio['p50']:.3f}, 5-95% {ratio['p5']:.3f}-{ratio['p95']:.3f})")
        if not within:
            note += ("; the interval misses 1, yet both ran the same dense kernels on the same shapes: "
                     "that is drift in the machine during timing, not a speedup")
        notes.insert(0, note)
    if kernels:
        notes.insert(0, kernels)
    if kernels and getattr(forms["pruned"], "sparse", False) and h["speedup_p50"] < 1.0:
        notes.append(f"{TWO_FOUR_SLOW} ({h['speedup_p50']:.2f}x at batch {head}).")
    return result


def time_together(dense_net: nn.Module, candidates: Mapping[str, tuple[nn.Module, str]], batch: torch.Tensor,
                  device, latency_cfg, *, precision: str | None = None, channels_last: bool | None = None) -> dict:
    """The dense model and several candidates, every one timed in turns with all the others in one
    session, at ``batch``'s size: the final round of a latency search. Candidates each timed in
    their own session against their own dense timing can be reordered by a drift in the machine
    between sessions; here every iteration runs them all back to back, so their p50s compare.

    ``candidates``: {name: (network, kernel family)} (the family says which run 2:4 kernels). The
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
    hw = detect(device)
    if channels_last is None:
        channels_last = _layout(latency_cfg, hw)
    nets = {"dense": dense_net, **{name: net for name, (net, _) in candidates.items()}}
    two_four = {name for name, (_, family) in candidates.items() if family == "semi_structured"}
    forms, facts, notes = _forms(nets, two_four, {bs: batch}, bs, device, latency_cfg, precision, channels_last, hw)
    warmup, iters = int(_setting(latency_cfg, "warmup")), int(_setting(latency_cfg, "iters"))
    transfer = bool(_setting(latency_cfg, "include_transfer"))
    x = batch if transfer else forms["dense"].prepare(batch)
    try:
        samples = time_interleaved(forms, x, device, warmup, iters, transfer, None, rotate=True)
    finally:
        free_scratch()
    models = {"dense": summarize(samples["dense"], bs)}
    for name, (_, family) in candidates.items():
        st = paired_stats(samples["dense"], samples[name], bs)
        models[name] = dict(st["pruned"], speedup_p50=st["speedup_p50"], paired_ratio=st["paired_ratio"],
                            speedup_beyond_noise=_beyond_noise(family, st["paired_ratio"]))
        if name in two_four:
            models[name]["kernels"] = _kernels(forms, name, facts["runtime"])
    _describe(forms, facts, hw, transfer)
    return {"models": models, "samples": samples, "runtime": facts, "notes": notes, "batch_size": bs, "iters": iters}


def _beyond_noise(family: str | None, paired_ratio: dict) -> bool:
    """A speedup is claimed only where even the slow end (5th percentile) of the per-iteration
    paired ratios beats 1, and never for unstructured zeros (the same dense kernels)."""
    return family != "magnitude" and paired_ratio["p5"] > 1.0


def _describe(forms: dict, facts: dict, hw, transfer: bool) -> dict:
    """Adds what every timing reports of its runtime to ``facts``; returns each form's description."""
    desc = {tag: form.describe() for tag, form in forms.items()}
    d = desc["dense"]
    facts.update(dtype=d["dtype"], layout=d["layout"], graph=all(x["graph"] for x in desc.values()),
                 fused_conv_relu=all(x.get("fused_conv_relu") for x in desc.values()),
                 conv_algos={tag: x["conv_algos"] for tag, x in desc.items() if x.get("conv_algos")},
                 linear_algos={tag: x["linear_algos"] for tag, x in desc.items() if x.get("linear_algos")},
                 device=hw.name, device_kind=hw.kind, hardware=hw.describe(), include_transfer=transfer)
    return desc


def _layout(latency_cfg, hw) -> bool:
    """The layout both forms run in when the caller does not say: the deploy runtime's
    ``latency.channels_last``; the eager runtime times the model as trained (NCHW unless told)."""
    if str(_setting(latency_cfg, "runtime")) == "eager":
        return False
    return bool(resolve_deploy_layout(_setting(latency_cfg, "channels_last"), hw).value)


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



