"""Serving speed per latency runtime: VGG16 (10-class head) dense and channel 0.5 in every runtime.

Every served form is built through ``prunelab.deploy``'s runtimes (the ONNX export made once per
model and shared by ONNX Runtime and OpenVINO), checked against the eager fp32 model at each batch
size (top-1 and logits, ``prunelab.deploy.checks``), then all of them, both models, are timed in
turns at each batch size (the order rotating every round), so a change in machine load hits every
column alike. Columns:

- ``eager fp32``: the model as trained;
- ``deploy bf16`` / ``deploy fp32``: prunelab's own form in that dtype;
- ``onnxruntime fp32``, ``openvino f32``, ``openvino bf16``: the folded model through ONNX;
- ``inductor bf16``: ``torch.compile`` with frozen weights.

On a GPU (``--device cuda``) the columns are the runtimes ``auto`` weighs there: eager fp32, the
deploy form in bf16 and fp16 (CUDA graphs where the spec captures them), inductor bf16 (compiled
into CUDA graphs) and ONNX Runtime fp32 through its CUDA provider where the installed build has one.

Runtimes whose package is missing (or that cannot run on the device) are left out and listed.
Random init is fine for timing.

    python benchmarks/runtimes.py            # batch 128 and 1, writes benchmarks/results/<date>-runtimes-<machine>.{json,md}
    python benchmarks/runtimes.py --device cuda            # the same on a GPU
    python benchmarks/runtimes.py --quick    # a smoke test: a tiny VGG, batch 4 and 1, a few rounds
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib.metadata
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent / "src") not in sys.path:
    sys.path.insert(0, str(HERE.parent / "src"))

from prunelab.deploy import registry  # noqa: E402
from prunelab.deploy.checks import DeployMismatchError, check_every_size  # noqa: E402
from prunelab.deploy.eager import eager_form  # noqa: E402
from prunelab.deploy.spec import resolve_spec  # noqa: E402
from prunelab.hardware import RELEVANT_FLAGS, _cpuinfo, detect  # noqa: E402
from prunelab.io import write_json, write_text  # noqa: E402
from prunelab.latency import summarize, time_interleaved  # noqa: E402

# column -> (runtime, dtype)
COLUMNS = {
    "eager fp32": ("eager", torch.float32),
    "deploy bf16": ("deploy", torch.bfloat16),
    "deploy fp32": ("deploy", torch.float32),
    "onnxruntime fp32": ("onnxruntime", torch.float32),
    "openvino f32": ("openvino", torch.float32),
    "openvino bf16": ("openvino", torch.bfloat16),
    "inductor bf16": ("inductor", torch.bfloat16),
}
GPU_COLUMNS = {
    "eager fp32": ("eager", torch.float32),
    "deploy bf16": ("deploy", torch.bfloat16),
    "deploy fp16": ("deploy", torch.float16),
    "inductor bf16": ("inductor", torch.bfloat16),
    "onnxruntime fp32": ("onnxruntime", torch.float32),
}


def columns_for(device: torch.device) -> dict:
    """The columns timed on ``device``: every CPU runtime on a CPU, the GPU's own set on a GPU."""
    return GPU_COLUMNS if torch.device(device).type == "cuda" else COLUMNS
PACKAGES = ("torch", "openvino", "onnxruntime", "onnx", "onnxscript")


def build_models(quick: bool, seed: int = 0) -> dict[str, torch.nn.Module]:
    from prunelab.models.factory import build_classifier
    from prunelab.pruning.channel import ChannelPruner, default_example

    torch.manual_seed(seed)
    if quick:
        sys.path.insert(0, str(HERE.parent / "tests"))
        from test_channel import tiny_vgg

        dense = tiny_vgg().eval()
    else:
        dense = build_classifier("vgg16", None, 10).eval()
    channel = ChannelPruner(dense, default_example(dense), round_to=16).finish(0.5).eval()
    return {"dense": dense, "channel 0.5": channel}


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _forms(models: dict, spec, columns: dict, example: torch.Tensor, skipped: dict,
           device: torch.device | str = "cpu") -> dict:
    """{(model, column): form}; ONNX exports shared by the ONNX-based columns of one model."""
    device = torch.device(device)
    from prunelab.deploy.onnxrt import OnnxFile, OnnxRuntimeForm
    from prunelab.deploy.openvino import OpenVinoForm

    forms, exports = {}, {}
    for col, (name, dtype) in columns.items():
        runtime = registry.get(name)
        why = runtime.missing() or runtime.unusable(spec.hardware)
        if why:
            skipped[col] = why
            continue
        s = dataclasses.replace(spec, runtime=name, dtype=dtype)
        for tag, net in models.items():
            t0 = time.perf_counter()
            if name == "eager":
                form = eager_form(net.to(device), None, channels_last=False)
            elif name in ("onnxruntime", "openvino"):
                exported = exports.get(tag) or exports.setdefault(tag, OnnxFile(net, example))
                form = (OnnxRuntimeForm(exported, False, device) if name == "onnxruntime"
                        else OpenVinoForm(exported, dtype, False))
            else:
                form = runtime.build(net.to(device), s, device=device, example_batch=example)
            forms[(tag, col)] = form
            print(f"built {tag} / {col} in {time.perf_counter() - t0:.1f} s", flush=True)
    return forms


def machine(device: torch.device, hw, threads: int) -> dict:
    """What ran it: the CPU's name and flags, and the GPU's where one did."""
    name, flags = _cpuinfo()
    out = {"cpu": name, "flags": sorted(flags & RELEVANT_FLAGS), "capability": hw.cpu_capability,
           "native_bf16": hw.native_bf16, "cores": os.cpu_count(), "threads": threads, "platform": platform.platform()}
    if device.type == "cuda":
        out.update(gpu=torch.cuda.get_device_name(device), cuda_capability=list(hw.cuda_capability or ()),
                   cuda=torch.version.cuda)
    return out


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    hw = detect(device)
    columns = columns_for(device)
    spec, _ = resolve_spec({"runtime": "deploy"}, hw)
    load_start, wall0 = os.getloadavg(), time.perf_counter()
    models = build_models(args.quick)
    gen = torch.Generator().manual_seed(1)
    batches = {b: torch.randn(b, 3, 32, 32, generator=gen).to(device) for b in args.batch_sizes}
    head = max(batches)
    skipped: dict[str, str] = {}
    forms = _forms(models, spec, columns, batches[head], skipped, device)
    compile_s, agreement, refused = {}, {}, {}
    for key, form in list(forms.items()):
        t0 = time.perf_counter()
        for b in sorted(batches):  # capture/compile every shape before any timing
            form.warm(batches[b])
        compile_s["/".join(key)] = round(time.perf_counter() - t0, 2)
        try:
            res = check_every_size(models[key[0]], form, None, batches, device, what=" / ".join(key))
            agreement["/".join(key)] = {str(b): {k: r[k] for k in ("agreement", "rms_rel_logit_error", "logit_scale")}
                                        for b, r in res.items()}
        except DeployMismatchError as exc:
            refused["/".join(key)] = str(exc)
            del forms[key]
    timings = {}
    for b in sorted(batches, reverse=True):
        iters = args.iters if b == head else args.iters_small
        named = {"/".join(k): f for k, f in forms.items()}
        samples = time_interleaved(named, batches[b], device, args.warmup, iters, False, None, rotate=True)
        timings[str(b)] = {"iters": iters, "p50_ms": {k: summarize(v, b) for k, v in samples.items()}}
        print(f"batch {b}: timed {len(named)} forms x {iters} rounds", flush=True)
    return {
        "benchmark": "runtimes", "date": dt.date.today().isoformat(), "quick": args.quick, "device": device.type,
        "machine": {**machine(device, hw, args.threads), "load_avg_start": list(load_start),
                    "load_avg_end": list(os.getloadavg()), "note": args.note},
        "versions": {p: _version(p) for p in PACKAGES}, "models": list(models), "batch_sizes": sorted(batches),
        "columns": list(columns), "skipped": skipped, "refused": refused, "agreement": agreement,
        "warm_s": compile_s, "timings": timings, "wall_s": round(time.perf_counter() - wall0, 1),
        # the goals are a CPU's; on a GPU the table is the record
        "goals": goals(timings, head, min(batches)) if not args.quick and device.type == "cpu" else {},
    }


def goals(timings: dict, head: int, small: int) -> dict:
    """The issue's goals, read from one run: the runtime ``auto`` would pick (fastest dense p50 at the
    large batch) against prunelab's deploy form (bf16) at both batch sizes, channel 0.5 against dense
    in that runtime, and batch 1 dense in milliseconds."""
    big, one = timings[str(head)]["p50_ms"], timings[str(small)]["p50_ms"]
    dense = {k.split("/", 1)[1]: v["p50"] for k, v in big.items() if k.startswith("dense/")}
    if not dense or "deploy bf16" not in dense:
        return {}
    best = min(dense, key=dense.get)
    out = {"vs_deploy_large": {"value": big["dense/deploy bf16"]["p50"] / big[f"dense/{best}"]["p50"], "goal": 1.2},
           "vs_deploy_batch1": {"value": one["dense/deploy bf16"]["p50"] / one[f"dense/{best}"]["p50"], "goal": 1.7},
           "channel_vs_dense_large": {"value": big[f"dense/{best}"]["p50"] / big[f"channel 0.5/{best}"]["p50"],
                                      "goal": 3.5},
           "dense_batch1_ms": {"value": one[f"dense/{best}"]["p50"], "goal": 5.0, "at_most": True}}
    for g in out.values():
        g.update(runtime=best, met=g["value"] <= g["goal"] if g.get("at_most") else g["value"] >= g["goal"])
    return out


def render(res: dict) -> str:
    m = res["machine"]
    load = max(m["load_avg_start"][0], m["load_avg_end"][0])
    where = m["gpu"] if m.get("gpu") else f"{m['cpu']} ({m['threads']} threads)"
    lines = [f"# Runtimes on {where}, {res['date']}", "",
             f"CPU flags: {', '.join(m['flags']) or 'none of note'}; native bf16: {m['native_bf16']}. Versions: "
             + ", ".join(f"{k} {v}" for k, v in res["versions"].items() if v) + ".",
             f"Load average {m['load_avg_start'][0]:.2f} at the start, {m['load_avg_end'][0]:.2f} at the end"
             + (" (**a loaded machine**: other work shared the cores, so absolute times are inflated; every form "
                "was timed in turns, so the ratios between columns hold)" if load > m["threads"] + 0.5 else "")
             + (f". {m['note']}" if m.get("note") else "") + ".", "",
             "p50 ms per batch, every model and runtime in turns (order rotating each round); bold: fastest in the row.", ""]
    cols = [c for c in res["columns"] if any(f"{mo}/{c}" in res["timings"][str(b)]["p50_ms"]
                                             for mo in res["models"] for b in res["batch_sizes"])]
    lines += ["| model, batch | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for mo in res["models"]:
        for b in sorted(res["batch_sizes"], reverse=True):
            p = res["timings"][str(b)]["p50_ms"]
            vals = {c: p[f"{mo}/{c}"]["p50"] for c in cols if f"{mo}/{c}" in p}
            best = min(vals, key=vals.get) if vals else None
            cells = [("**%.1f**" if c == best else "%.1f") % vals[c] if c in vals else "-" for c in cols]
            lines.append(f"| {mo}, {b} | " + " | ".join(cells) + " |")
    lines += ["", f"Rounds: batch {max(res['batch_sizes'])}: {res['timings'][str(max(res['batch_sizes']))]['iters']}, "
              f"batch {min(res['batch_sizes'])}: {res['timings'][str(min(res['batch_sizes']))]['iters']}. "
              f"Wall time {res['wall_s']:.0f} s.", ""]
    g = res.get("goals") or {}
    if g:
        lines += [f"## Goals, in the runtime auto would pick here ({next(iter(g.values()))['runtime']})", "",
                  "| goal | measured | wanted | met |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['value']:.2f} | {'<=' if v.get('at_most') else '>='} {v['goal']} | "
                  f"{'yes' if v['met'] else 'no'} |" for k, v in g.items()]
        lines.append("")
    if res["skipped"] or res["refused"]:
        lines += ["Left out: " + "; ".join(f"{k}: {v}" for k, v in {**res["skipped"], **res["refused"]}.items()), ""]
    worst = max((r["rms_rel_logit_error"] for a in res["agreement"].values() for r in a.values()), default=0.0)
    lines.append(f"Every timed form agreed with eager fp32 at every batch size (largest RMS logit error {worst:.2%}).")
    return "\n".join(lines)


def result_machine(m: dict) -> str:
    """The machine part of the result's name: the GPU's (nvidia-h100-...) or the CPU's."""
    if m.get("gpu"):
        return "-".join(m["gpu"].lower().replace("nvidia ", "nvidia-").split())
    return f"{platform.machine()}-cpu-{m['threads']}threads"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: a tiny VGG, batch 4 and 1, a few rounds")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU's runtimes")
    ap.add_argument("--iters", type=int, default=None, help="timed rounds at the large batch (default 30)")
    ap.add_argument("--iters-small", type=int, default=None, help="timed rounds at batch 1 (default 100)")
    ap.add_argument("--note", default="", help="one line about the machine's state, written into the result")
    ap.add_argument("--out", type=Path, default=None, help="folder for the results (default benchmarks/results)")
    args = ap.parse_args(argv)
    args.batch_sizes = [1, 4] if args.quick else [1, 128]
    args.warmup = 1 if args.quick else 3
    args.iters = args.iters or (2 if args.quick else 30)
    args.iters_small = args.iters_small or (3 if args.quick else 100)
    out = args.out or (HERE / ".cache" / "quick" if args.quick else HERE / "results")
    res = measure(args)
    stem = f"{res['date']}-runtimes-{result_machine(res['machine'])}"
    write_json(out / f"{stem}.json", res)
    md = render(res)
    write_text(out / f"{stem}.md", md + "\n")
    print(md, flush=True)
    return res


if __name__ == "__main__":
    main()
