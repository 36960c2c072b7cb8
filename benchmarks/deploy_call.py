"""Where a deployed CUDA forward's time goes: the captured graph alone against prunelab's call around
it, and what fusing each convolution with its ReLU buys inside the graph.

VGG16 (random init, 10 classes, 32x32), dense and channel 0.5, in the dtype and layout ``auto``
resolves to, every form taking turns each iteration (``prunelab.latency.time_interleaved``, CUDA
events), the batch handed in as the timer hands it (fp32, NCHW, on the device):

- ``replay``: ``graph.replay()`` alone on a batch already in the graph's input buffer: the floor;
- ``call``: ``prunelab.deploy.native.deploy_form``'s forward (size check, the copy into the buffer that
  casts the batch, replay, copy of the logits out), as the reports time it;
- ``castfirst``: the call as it was before: a separate cast kernel, then the copy;
- ``fused``: the deploy form with each Conv2d+ReLU pair as one cuDNN call (``deploy_form(fuse=True)``,
  what ``latency.fuse=auto`` gives on CUDA), its own graph captured.

``--profile`` adds the dense forms' GPU kernels by time (``torch.profiler``).

Each form's top-1 answers are checked against eager fp32 first. Writes
``benchmarks/results/<date>-deploy-call-<device>.json`` and ``.md`` atomically.

    python -m benchmarks.deploy_call [--profile]      # CUDA only
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import DEFAULT_OUT, result_tag
from benchmarks.deploy_speed import build_models
from prunelab.deploy.checks import agreement
from prunelab.deploy.native import deploy_form
from prunelab.hardware import detect, resolve_deploy_layout, resolve_dtype
from prunelab.io import write_json, write_text
from prunelab.latency import paired_stats, summarize, time_interleaved
from prunelab.report.markdown import table


class Replay(nn.Module):
    """Replays a form's captured graph for the batch's shape, nothing else (the input is already there)."""

    def __init__(self, form):
        super().__init__()
        self.form = form

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.form._graphs[tuple(x.shape)]
        g.graph.replay()
        return g.output


class CastFirst(nn.Module):
    """The call as it was until 2026-11-27: the batch cast to the form's dtype and layout
    by one kernel, then copied into the graph's buffer by another."""

    def __init__(self, form):
        super().__init__()
        self.form = form

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.form._graphs[tuple(x.shape)](self.form.prepare(x))


def kernel_table(net: nn.Module, x: torch.Tensor, rows: int = 12) -> str:
    """The GPU kernels of ten eager forwards of ``net`` (the same kernels its graph replays), by time."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        net(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                net(x)
            torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=70)


def measure(args) -> dict:
    device = torch.device("cuda")
    hw = detect(device)
    dtype, cl = resolve_dtype("auto", hw).value, bool(resolve_deploy_layout("auto", hw).value)
    dense, channel, facts = build_models()
    dense, channel = dense.to(device), channel.to(device)
    gen = torch.Generator().manual_seed(1)
    batches = {b: torch.randn(b, 3, 32, 32, generator=gen).to(device) for b in args.batch_sizes}
    forms, eager_of, errors, build_s, profiles = {}, {}, {}, {}, {}
    for name, net in (("dense", dense), ("channel", channel)):
        form = deploy_form(net, dtype=dtype, channels_last=cl, device=device, cuda_graph=True, fuse=False)
        for b in batches.values():
            form.warm(b)
        forms[f"{name}_replay"], forms[f"{name}_call"] = Replay(form), form
        forms[f"{name}_castfirst"] = CastFirst(form)
        try:  # a fused form this GPU or build refuses is the finding, not a crash
            t0 = time.perf_counter()
            fused = deploy_form(net, dtype=dtype, channels_last=cl, device=device, cuda_graph=True, fuse=True)
            for b in batches.values():
                fused.warm(b)
            build_s[f"{name}_fused"] = round(time.perf_counter() - t0, 1)
            forms[f"{name}_fused"] = fused
        except Exception as exc:  # noqa: BLE001
            errors[f"{name}_fused"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
        eager_of.update({k: net for k in forms if k.startswith(name)})
        if args.profile and name == "dense":
            x = form.prepare(batches[max(batches)])
            profiles["dense_deploy"] = kernel_table(form.net, x)
            if "dense_fused" in forms:
                profiles["dense_fused"] = kernel_table(forms["dense_fused"].net, x)
    head = max(batches)
    checks = {k: agreement(eager_of[k], f, [batches[head]], device) for k, f in forms.items() if "replay" not in k}
    timings = {}
    for b, x in sorted(batches.items()):
        iters = args.iters if b == head else args.iters_small
        with torch.inference_mode():  # fill every graph's input once: the replay forms read it
            for f in forms.values():
                if not isinstance(f, Replay):
                    f(x)
        samples = time_interleaved(forms, x, device, warmup=3, iters=iters, rotate=True)
        t = {"iters": iters, "p50_ms": {k: summarize(v, b) for k, v in samples.items()}, "pairs": {}}
        for name in ("dense", "channel"):
            for other in ("castfirst", "fused"):
                if f"{name}_{other}" in samples:
                    t["pairs"][f"{name}_{other}_vs_call"] = paired_stats(samples[f"{name}_call"],
                                                                         samples[f"{name}_{other}"], b)
            t["pairs"][f"{name}_replay_vs_call"] = paired_stats(samples[f"{name}_call"], samples[f"{name}_replay"], b)
        timings[str(b)] = t
    return {"date": dt.date.today().isoformat(), "device": torch.cuda.get_device_name(device),
            "torch": torch.__version__, "cuda": torch.version.cuda, "dtype": str(dtype).removeprefix("torch."),
            "channels_last": cl, **facts, "agreement": checks, "errors": errors, "build_s": build_s,
            "timings": timings, "profiles": profiles}


def render(res: dict) -> str:
    lines = [f"# Deploy call cost, {res['date']}, {res['device']}", "",
             f"torch {res['torch']} (CUDA {res['cuda']}); VGG16 dense and channel 0.5, {res['dtype']}, "
             f"{'channels_last' if res['channels_last'] else 'NCHW'}; every form in turns (CUDA events); the "
             "batch handed in fp32 NCHW on the device.", ""]
    for b, t in sorted(res["timings"].items(), key=lambda kv: -int(kv[0])):
        rows = [(k, f"{v['p50']:.3f}", f"{v['p90']:.3f}") for k, v in t["p50_ms"].items()]
        lines += [f"## Batch {b}, {t['iters']} iterations in turns", "", table(["form", "p50 ms", "p90 ms"], rows), ""]
        for pair, s in t["pairs"].items():
            pr = s["paired_ratio"]
            lines.append(f"- {pair}: {s['speedup_p50']:.3f}x (paired p50 {pr['p50']:.3f}, 5-95% "
                         f"{pr['p5']:.3f}-{pr['p95']:.3f})")
        lines.append("")
    lines += ["## Agreement with eager fp32 (top-1)", "",
              table(["form", "images", "agreement", "max rel logit diff"],
                    [(k, a["images"], f"{a['agreement']:.4f}", f"{a['max_rel_logit_diff']:.1e}")
                     for k, a in res["agreement"].items()]), ""]
    lines += [f"- built in {s} s: {k}" for k, s in res["build_s"].items()]
    lines += [f"- **{k} could not be built**: {v}" for k, v in res["errors"].items()]
    for k, t in res.get("profiles", {}).items():
        lines += ["", f"## Kernels of {k}, batch {max(int(b) for b in res['timings'])}, ten eager forwards", "",
                  "```", t, "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", action="store_true", help="also list the dense forms' kernels by GPU time")
    ap.add_argument("--iters", type=int, default=80)
    ap.add_argument("--iters-small", type=int, default=200)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("deploy_call times CUDA graphs: run it on a machine with a CUDA GPU")
    args.batch_sizes = [1, 128]
    res = measure(args)
    stem = result_tag("deploy-call", "cuda")
    write_json(args.out / f"{stem}.json", res)
    md = render(res)
    write_text(args.out / f"{stem}.md", md)
    print(md, flush=True)
    return res


if __name__ == "__main__":
    main()
