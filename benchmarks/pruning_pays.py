"""Does pruning pay? Structured channel pruning vs dense on this machine, one process.

Measures, on one fine-tuned VGG16 (default: the shared CIFAR-10 subset, random init, a few epochs):
  1. p50 latency at batch 128 of dense, channel-pruned at 0.5, and both with the 7x7 pool folded
     into classifier[0] (rounds interleaved so load drifts hit every model alike); then the same
     ratio through the pipeline (`prune.method=channel prune.ratio=0.5`, its latency callback);
  2. a channel search (one-shot) within the tolerance: ratio, speedup, params, MACs;
  3. the highest ratio within the tolerance one-shot vs iterative (with recovery), for magnitude
     and channel pruning, on the same weights and the same grid;
  4. ONNX export of dense and channel-pruned models checked against PyTorch (max abs diff).
Writes benchmarks/results/<date>-pruning-pays-<device>.json and .md.

    python -m benchmarks.pruning_pays [--epochs 4] [--data-root ../shared/data/cifar10-subset]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import prunelab
from prunelab.compose import compose
from prunelab.export import check_onnx, export_onnx
from prunelab.io import load_state_dict, write_json, write_text
from prunelab.latency import percentiles, time_interleaved
from prunelab.models.factory import build_classifier
from prunelab.models.rewrite import fold_pool
from prunelab.pipeline import run
from prunelab.pruning.channel import ChannelPruner, count_macs, default_example
from prunelab.report.markdown import table

CONF = Path(prunelab.__file__).parent / "conf"
HERE = Path(__file__).resolve().parent


def compose_run(overrides: list[str], workdir: Path):
    return run(compose(overrides, workdir, workdir / f"run-{len(list(workdir.glob('run-*')))}"))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _summary(samples: dict[str, list[float]]) -> dict:
    return {k: dict(percentiles(v, (50, 90)), n=len(v)) for k, v in samples.items()}


def interleaved_p50(models: dict, x: torch.Tensor, rounds: int, warmup: int = 2) -> dict:
    return _summary(time_interleaved(models, x, "cpu", warmup=warmup, iters=rounds))


def interleaved_ort_p50(paths: dict, x: np.ndarray, rounds: int, warmup: int = 2) -> dict:
    import onnxruntime as ort

    runs = {}
    for k, path in paths.items():
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        runs[k] = (sess, {sess.get_inputs()[0].name: x})
    samples = {k: [] for k in runs}
    for sess, feed in runs.values():
        for _ in range(warmup):
            sess.run(None, feed)
    for _ in range(rounds):
        for k, (sess, feed) in runs.items():
            t0 = time.perf_counter()
            sess.run(None, feed)
            samples[k].append((time.perf_counter() - t0) * 1000)
    return _summary(samples)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=str(HERE.parent.parent / "shared" / "data" / "cifar10-subset"))
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--arch", default="vgg16")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--grid", default="[0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9]")
    ap.add_argument("--channel-grid", default="[0.05,0.1,0.15,0.2,0.25,0.3,0.4,0.5]",
                    help="the channel searches' grid: filters of an undertrained VGG16 are alike, so one-shot "
                         "removal hurts from the first few percent and the steps that matter are small")
    ap.add_argument("--tolerance", type=float, default=1.0)
    ap.add_argument("--round-to", type=int, default=16, help="prune.round_to for every channel-pruned model")
    ap.add_argument("--batch", type=int, default=128, help="latency batch size")
    ap.add_argument("--quick", action="store_true",
                    help="synthetic data, resnet18, one epoch, tiny grids and batches: checks the script end to end")
    ap.add_argument("--recover-batches", default="1.0", help="fraction (or count) of a training epoch per recovery")
    ap.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                    help="train and recover with +experiment=fast (bf16-mixed, channels-last, on-device batches)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)

    if args.quick:
        args.arch, args.epochs, args.rounds, args.batch, args.fast = "resnet18", 1, 2, 16, False
        args.grid, args.channel_grid, args.recover_batches = "[0.3,0.6]", "[0.1,0.2]", "2"
    work = Path(args.workdir or tempfile.mkdtemp(prefix="prunelab-pays-"))
    # --quick only proves the path runs: 51 validation images cannot resolve a 1-point tolerance, so
    # the search's refusal of such a split is waived there
    data = (["data=synthetic", "data.train_size=256", "data.test_size=64", "trainer.limit_train_batches=2",
             "search.allow_weak_model=true"]
            if args.quick else [f"data.root={args.data_root}", "data.download=false"])
    base = data + ["model.weights=null", f"model.arch={args.arch}",
            f"trainer.max_epochs={args.epochs}", "trainer.accelerator=cpu", "stages.latency=false",
            f"paths.cache_dir={work / 'cache'}", f"search.tolerance={args.tolerance}", f"prune.round_to={args.round_to}"] + (["+experiment=fast"] if args.fast else [])
    t_start, cpu_start = time.perf_counter(), time.process_time()
    load_start = os.getloadavg()
    print("fine-tuning (or reusing) the dense model ...", flush=True)
    dense_report = compose_run(base + ["stages.prune=false"], work)
    dense_pt = Path(dense_report["config"]["paths"]["output_dir"]) / "models" / "dense.pt"
    common = base + [f"finetune.weights_path={dense_pt}", f"search.grid={args.grid}", "search.refine_step=null"]
    results: dict = {"dense_val_acc": dense_report["dense"]["val_acc"], "dense_test_acc": dense_report["dense"]["test_acc"]}

    # 1. latency: dense, channel 0.5, folded variants, same process, interleaved
    net = build_classifier(args.arch, None, 10)
    net.load_state_dict(load_state_dict(dense_pt))
    net.eval()
    example = default_example(net)
    pruner = ChannelPruner(net, example, round_to=args.round_to)
    ch = pruner.finish(0.5).eval()
    ch_stats = pruner.stats()
    models = {"dense": net, "channel_0.5": ch}
    try:
        models["dense_folded"] = fold_pool(net)
        models["channel_0.5_folded"] = fold_pool(ch)
    except ValueError as exc:
        print("fold refused:", exc)
    x = torch.randn(args.batch, 3, 32, 32)
    lat = interleaved_p50(models, x, args.rounds)
    d50 = lat["dense"]["p50"]
    results["latency"] = {k: dict(v, batch=args.batch, speedup_p50=d50 / v["p50"]) for k, v in lat.items()}
    results["channel_0.5"] = {"channels": ch_stats["channels"], "channels_removed": ch_stats["channels_removed"],
                              "params": sum(p.numel() for p in ch.parameters()),
                              "dense_params": sum(p.numel() for p in net.parameters()),
                              "macs": count_macs(ch, example), "dense_macs": count_macs(net, example)}
    if "channel_0.5_folded" in models:
        results["channel_0.5"]["folded_params"] = sum(p.numel() for p in models["channel_0.5_folded"].parameters())

    # 4. ONNX round trip of dense and channel-pruned (before the long searches)
    onnx_dir = work / "onnx"
    onnx_dir.mkdir(exist_ok=True)
    xo = torch.randn(8, 3, 32, 32)
    results["onnx_max_abs_diff"] = {}
    sessions = {}
    for name in ("dense", "dense_folded", "channel_0.5", "channel_0.5_folded"):
        if name in models:
            path = export_onnx(models[name], onnx_dir / f"{name}.onnx", batch=8)
            results["onnx_max_abs_diff"][name] = check_onnx(models[name], path, xo)
            sessions[name] = path
    # The exported files as a deployment runs them: onnxruntime on the CPU, batch 128, interleaved.
    ort_lat = interleaved_ort_p50(sessions, x.numpy(), max(5, args.rounds // 2))
    results["onnxruntime_latency"] = {k: dict(v, batch=args.batch, speedup_p50=ort_lat["dense"]["p50"] / v["p50"])
                                               for k, v in ort_lat.items()}
    del models, ch, net

    # 1b. the same ratio through the pipeline: its latency stage times dense and pruned in turns.
    # Twice: the default runtime (fp32, NCHW) and the fast path the models were trained with.
    runtimes = {"default": ["trainer.precision=32-true", "model.channels_last=false", "data.on_device=false"],
                "fast": ["trainer.precision=bf16-mixed", "model.channels_last=true", "data.on_device=true"]}
    results["pipeline_channel_0.5"] = {}
    for name, flags in runtimes.items():
        print(f"pipeline: channel 0.5 with latency, {name} runtime ...", flush=True)
        rep = compose_run(common + flags + ["prune.method=channel", "prune.ratio=0.5", "stages.latency=true",
                                            f"latency.batch_size={args.batch}", "finetune.cache=false"], work)
        results["pipeline_channel_0.5"][name] = {
            "dense_p50_ms": rep["dense"]["latency_ms"]["p50"], "pruned_p50_ms": rep["pruned"]["latency_ms"]["p50"],
            "speedup_p50": rep["pruned"].get("speedup_p50"), "params": rep["pruned"].get("params"),
            "macs": rep["pruned"].get("macs"), "val_acc": rep["pruned"]["val_acc"]["value"],
            "precision": rep["config"]["trainer"]["precision"], "channels_last": rep["config"]["model"]["channels_last"],
            "interleaved": bool(rep["pruned"]["latency_ms"].get("interleaved_with"))}

    # 2 + 3. searches: one-shot and iterative, magnitude and channel, same weights and grid
    searches = {}
    for method in ("channel", "magnitude"):
        for sched in ("oneshot", "iterative"):
            print(f"search: {method} {sched} ...", flush=True)
            extra = [f"prune.method={method}", f"prune.schedule={sched}", "finetune.cache=false",
                     f"search.grid={args.channel_grid if method == 'channel' else args.grid}"]
            if sched == "iterative":
                extra += ["prune.recover_epochs=1", f"trainer.limit_train_batches={args.recover_batches}"]
            t0 = time.perf_counter()
            # Channel searches are timed too (dense and chosen model in turns, batch as above).
            timed = ["stages.latency=true", "latency.iters=10", "latency.warmup=2", f"latency.batch_size={args.batch}"]
            rep = compose_run(common + extra + (timed if method == "channel" else []), work)
            s = rep["search"]
            searches[f"{method}_{sched}"] = {
                "best_ratio": s["best_ratio"], "threshold": s["threshold"], "seconds": time.perf_counter() - t0,
                "curve": [{k: c.get(k) for k in ("ratio", "val_acc", "recovered_val_acc", "passed", "params", "macs")}
                          for c in s["curve"]],
                "pruned_val_acc": rep["pruned"]["val_acc"]["value"], "pruned_test_acc": rep["pruned"]["test_acc"]["value"],
                "params": rep["pruned"].get("params"), "macs": rep["pruned"].get("macs"),
                "speedup_p50": rep["pruned"].get("speedup_p50"),
            }
    results["searches"] = searches

    device = f"{platform.machine()}-cpu-{torch.get_num_threads()}threads"
    date = dt.date.today().isoformat()
    wall = time.perf_counter() - t_start
    out = {"device": device, "cpu": _cpu_name(), "date": date, "torch": torch.__version__,
           "load_avg_start": load_start, "load_avg_end": os.getloadavg(),
           # CPU time of this process over its wall time: about the thread count on an idle
           # machine; much less means other work shared the cores and the timings are inflated.
           "cores_used": (time.process_time() - cpu_start) / wall,
           "setup": {"arch": args.arch, "epochs": args.epochs, "data_root": args.data_root, "grid": args.grid,
                     "channel_grid": args.channel_grid,
                     "tolerance": args.tolerance, "round_to": args.round_to, "recover_batches": args.recover_batches, "fast": args.fast,
                     "batch": args.batch, "quick": args.quick},
           "wall_s": wall, "results": results}
    stem = Path(args.out) / f"{date}-pruning-pays-{device}"
    write_json(stem.with_suffix(".json"), out)
    lat = results["latency"]
    pipe = results["pipeline_channel_0.5"]
    ch05 = results["channel_0.5"]
    md = [f"# Does pruning pay? {date}, {device}, {out['cpu']} (torch {torch.__version__})", "",
          f"{args.arch}, random init, {args.epochs} epochs on {'synthetic data' if args.quick else Path(args.data_root).name}"
          f"{' (+experiment=fast)' if args.fast else ''}; dense val acc {results['dense_val_acc']['value']:.2f}% "
          f"(n={results['dense_val_acc']['n']}); tolerance {args.tolerance} points; grid {args.grid} "
          f"(channel: {args.channel_grid}); "
          f"recovery {args.recover_batches} epoch per step. Wall {wall:.0f} s, cores used {out['cores_used']:.2f}, "
          f"load {load_start[0]:.1f} -> {out['load_avg_end'][0]:.1f}.", "",
          f"## Latency, batch {args.batch}, p50 (same process, interleaved, fp32)", "",
          f"Channel 0.5 (`prune.round_to={args.round_to}`): {ch05['channels_removed']:.3f} of the conv channels removed, widths "
          f"{list(ch05['channels'].values())}, {ch05['params']:,} params, {ch05['macs']:,} MACs per image "
          f"(dense {ch05['dense_params']:,} / {ch05['dense_macs']:,}).", "",
          table(["model", "p50 ms", "speedup"], [(k, f"{v['p50']:.1f}", f"{v['speedup_p50']:.2f}x") for k, v in lat.items()]),
          "", "Through the pipeline (`prune.method=channel prune.ratio=0.5`, its latency stage timing dense and "
          f"pruned in turns, batch {args.batch}):", "",
          table(["runtime", "precision", "channels_last", "dense p50 ms", "pruned p50 ms", "speedup"],
                [(k, v["precision"], str(v["channels_last"]).lower(), f"{v['dense_p50_ms']:.1f}",
                  f"{v['pruned_p50_ms']:.1f}", f"{v['speedup_p50']:.2f}x") for k, v in pipe.items()]), "",
          "## Highest ratio within tolerance: one-shot vs iterative (recovery)", "",
          table(["method", "schedule", "best ratio", "val acc %", "params", "MACs", "speedup"],
                [(k.split("_")[0], k.split("_")[1], f"{v['best_ratio']:.2f}", f"{v['pruned_val_acc']:.2f}",
                  f"{v['params']:,}" if v["params"] else "-", f"{v['macs']:,}" if v["macs"] else "-",
                  f"{v['speedup_p50']:.2f}x" if v["speedup_p50"] else "-") for k, v in searches.items()]),
          "", f"## Exported ONNX under onnxruntime (CPU), batch {args.batch}, p50 (interleaved)", "",
          table(["model", "p50 ms", "speedup"], [(k, f"{v['p50']:.1f}", f"{v['speedup_p50']:.2f}x")
                                                 for k, v in results["onnxruntime_latency"].items()]),
          "", "## ONNX vs PyTorch, max abs difference", "",
          table(["model", "max abs diff"], [(k, f"{v:.2e}") for k, v in results["onnx_max_abs_diff"].items()]), ""]
    write_text(stem.with_suffix(".md"), "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
