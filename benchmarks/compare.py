"""``python -m benchmarks.compare``: the notebook's procedure against prunelab's, in one run.

Same data, same device, same fine-tuned weights. Each measurement (a ``child_*`` step of
``benchmarks.procedures``) runs in its own fresh process (``benchmarks.isolated.run_child``), so peak
memory is that procedure's alone and no allocator, thread pool or autocast state leaks from one to
the next; this module sets them side by side, in ratios and goals. Results go to
``benchmarks/results/<date>-<device>.json`` and ``.md`` (atomic writes).

    python -m benchmarks.compare                    # the shared CIFAR-10 subset, vgg16
    python -m benchmarks.compare --data synthetic   # generated data, no files
    python -m benchmarks.compare --quick --out DIR  # synthetic, resnet18, small grid (the test)
    python -m benchmarks.compare --weights dense.pt # skip training, use these weights
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import DEFAULT_CACHE, DEFAULT_OUT, DEFAULT_ROOT, REPO, device_slug
from benchmarks.isolated import run_child
from benchmarks.procedures import fast_resolution

GRID = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
QUICK_GRID = (0.3, 0.6, 0.9)

# Per-procedure figures, and the goals of the "Speed and scale" issue on their ratios.
METRICS = ("search_wall_s", "search_images", "search_peak_rss", "finetune_images_per_s",
           "finetune_images_per_s_fast", "latency_p50", "latency_p90")


RSS_GOAL_DEFINITION = (
    "(peak RSS of the search process from just before the search's model is built to the chosen ratio) "
    "minus (its RSS at that moment), divided by one model's parameter bytes (model_bytes). The baseline "
    "holds the interpreter, torch, Lightning, Hydra and the loaded data; the peak is VmHWM after resetting "
    "the high-water mark at the baseline (Linux), else the process's ru_maxrss, which can only overstate it. "
    "DataLoader worker processes are not included.")


def ratios(notebook: dict, prunelab: dict, keys=METRICS) -> dict:
    """prunelab / notebook for each raw figure (None where the notebook's is missing or zero)."""
    out = {}
    for k in keys:
        a, b = prunelab.get(k), notebook.get(k)
        out[k] = (a / b) if isinstance(a, int | float) and isinstance(b, int | float) and b else None
    return out


def goals(notebook: dict, prunelab: dict, ratio: dict, same: bool) -> dict:
    model = prunelab["model_bytes"]
    above = prunelab["search_peak_rss_above_baseline"] / model
    return {
        "search_wall_le_0.1x_same_answer": {
            "target": "prunelab search wall <= 0.1 x notebook's, same answer",
            "measured": ratio["search_wall_s"], "met": bool(same and ratio["search_wall_s"] <= 0.1)},
        "search_peak_rss_lt_2.5x_model": {
            "target": "prunelab search peak RSS above its pre-model baseline < 2.5 x one model's parameter bytes",
            "definition": RSS_GOAL_DEFINITION,
            "measured": above,  # = prunelab.search_peak_rss_above_baseline_x_model
            "measured_absolute": prunelab["search_peak_rss"] / model,  # whole process, for reference
            "met": above < 2.5},
        "finetune_default_ge_notebook": {
            "target": "prunelab default fine-tune images/s >= notebook's",
            "measured": ratio["finetune_images_per_s"], "met": ratio["finetune_images_per_s"] >= 1.0},
        "finetune_fast_ge_1.5x_notebook": {
            "target": "prunelab fast fine-tune images/s >= 1.5 x notebook's",
            "measured": ratio["finetune_images_per_s_fast"], "met": ratio["finetune_images_per_s_fast"] >= 1.5},
    }


def best(runs: list[dict]) -> dict:
    """The best of repeated runs (highest images/s, else lowest p50), every run's figure kept."""
    if "images_per_s" in runs[0]:
        pick, key = max(runs, key=lambda r: r["images_per_s"]), "images_per_s"
    else:
        pick, key = min(runs, key=lambda r: r["p50_ms"]), "p50_ms"
    return dict(pick, repeats=[r[key] for r in runs])


# -- the run ------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=("cifar10", "synthetic"), default=None,
                   help="cifar10: the folder --data-root (default); synthetic: generated data")
    p.add_argument("--data-root", default=DEFAULT_ROOT, help="cifar-10-batches-py parent (relative to the repo)")
    p.add_argument("--arch", default=None, help="torchvision classifier (default vgg16; --quick: resnet18)")
    p.add_argument("--epochs", type=int, default=None, help="fine-tune epochs from random init (default 5)")
    p.add_argument("--weights", default=None, help="a dense.pt to use instead of fine-tuning")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--out", default=None, help=f"results folder (default {DEFAULT_OUT.relative_to(REPO)})")
    p.add_argument("--cache-dir", default=None,
                   help="fine-tune cache (default benchmarks/.cache/finetune; --quick: none, trains every time)")
    p.add_argument("--tolerance", type=float, default=1.0)
    p.add_argument("--rule", choices=("contiguous", "highest"), default="contiguous",
                   help="the notebook procedure's refinement span and answer rule (prunelab: contiguous)")
    p.add_argument("--num-workers", type=int, default=2, help="the notebook's loader workers")
    p.add_argument("--finetune-warmup", type=int, default=None)
    p.add_argument("--finetune-batches", type=int, default=None)
    p.add_argument("--latency-warmup", type=int, default=None)
    p.add_argument("--latency-iters", type=int, default=None)
    p.add_argument("--repeats", type=int, default=1,
                   help="run the latency and fine-tune measurements this many times, interleaved, and keep "
                        "each one's best (steadier on a loaded machine)")
    p.add_argument("--quick", action="store_true",
                   help="synthetic data, resnet18, a small grid, few batches: a test-sized run")
    return p.parse_args(argv)


def build_spec(args: argparse.Namespace, work_dir: str) -> dict:
    q = args.quick
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    root = Path(args.data_root)
    root = root if root.is_absolute() else (REPO / root).resolve()
    cache = args.cache_dir if args.cache_dir is not None else (None if q else str(DEFAULT_CACHE))
    return {
        "data": args.data or ("synthetic" if q else "cifar10"),
        "data_root": str(root),
        "train_size": 640 if q else 1280, "test_size": 128 if q else 256,
        "arch": args.arch or ("resnet18" if q else "vgg16"),
        "epochs": args.epochs if args.epochs is not None else (2 if q else 5),
        "device": device,
        "threads": args.threads or torch.get_num_threads(),
        "grid": list(QUICK_GRID if q else GRID),
        "step": 0.1 if q else 0.01,
        "tolerance": args.tolerance,
        "rule": args.rule,
        "num_workers": args.num_workers,
        "ft_warmup": args.finetune_warmup if args.finetune_warmup is not None else (1 if q else 2),
        "ft_batches": args.finetune_batches or (2 if q else 8),
        "latency_warmup": args.latency_warmup if args.latency_warmup is not None else (1 if q else 5),
        "latency_iters": args.latency_iters or (3 if q else 30),
        "cache_dir": cache,
        "work_dir": work_dir,
        # Training the benchmark's weights uses prunelab's fast settings (it is not what is measured);
        # on CUDA without compile: for a few short epochs the compile outlasts the training (the
        # deployed-speed issue saw compare.py time out 170 s into this phase on an H100).
        "train_overrides": ["+experiment=fast"] + (["model.compile=false"] if str(device).startswith("cuda") else []),
    }


def _section(search: dict, latency: dict, ft: dict, ft_fast: dict, model_bytes: int) -> dict:
    keep = {k: v for k, v in search.items() if k not in ("process_peak_rss", "child_wall_s")}
    keep.update(
        search_peak_rss_x_model=search["search_peak_rss"] / model_bytes,
        search_peak_rss_above_baseline_x_model=search["search_peak_rss_above_baseline"] / model_bytes,
        search_eval_ms_per_image=1000.0 * search["breakdown_s"]["evaluate"] / search["search_images"],
        finetune_images_per_s=ft["images_per_s"],
        finetune_images_per_s_fast=ft_fast["images_per_s"],
        latency_p50=latency["p50_ms"],
        latency_p90=latency["p90_ms"],
        latency=latency, finetune=ft, finetune_fast=ft_fast,
    )
    return keep


def render_markdown(report: dict) -> str:
    nb, pl, r = report["notebook"], report["prunelab"], report["ratio"]
    s = report["setup"]
    mib = 2**20
    rows = [
        ("search wall time (s)", "search_wall_s", "{:.1f}"),
        ("images evaluated by the search", "search_images", "{:,}"),
        ("search peak RSS (MiB)", "search_peak_rss", None),
        ("fine-tune images/s (default)", "finetune_images_per_s", "{:.1f}"),
        ("fine-tune images/s (fast)", "finetune_images_per_s_fast", "{:.1f}"),
        ("latency p50 (ms, batch 128)", "latency_p50", "{:.1f}"),
        ("latency p90 (ms, batch 128)", "latency_p90", "{:.1f}"),
    ]
    lines = [f"# Notebook vs prunelab: {report['device']} ({report['date']})", "",
             f"Data: {s['data']} ({s['val_images']} validation images); model: {s['arch']}, "
             f"weights: {s['weights']['description']}; {s['threads']} torch threads; torch {s['torch']}; "
             f"load average at start/end {s['loadavg_start'][0]:.2f}/{s['loadavg_end'][0]:.2f}.", "",
             "| figure | notebook | prunelab | prunelab / notebook |", "| --- | ---: | ---: | ---: |"]
    for label, key, fmt in rows:
        if key == "search_peak_rss":
            a, b = (f"{x[key] / mib:,.0f} ({x['search_peak_rss_x_model']:.1f}x model; "
                    f"{x['search_peak_rss_above_baseline_x_model']:.2f}x above its pre-model baseline)" for x in (nb, pl))
        else:
            a, b = fmt.format(nb[key]), fmt.format(pl[key])
        if key == "finetune_images_per_s_fast":
            a = f"{a} (plain loop; no fast mode)"
        lines.append(f"| {label} | {a} | {b} | {r[key]:.3f} |")
    lines += ["", f"Answers (tolerance {s['tolerance']} points): notebook procedure "
              f"{nb['best_ratio_contiguous']} (contiguous rule), {nb['best_ratio_highest']} (its own highest rule); "
              f"prunelab {pl['best_ratio']} (contiguous). Same answer: **{report['same_answer']}**. "
              f"Candidates evaluated: notebook {nb['candidates']}, prunelab {pl['candidates']}. "
              f"Dense validation accuracy: notebook {nb['dense_acc']:.2f}%, prunelab {pl['dense_acc']:.2f}%.", "",
              "| goal | measured | met |", "| --- | ---: | :---: |"]
    for g in report["goals"].values():
        extra = (f" ({g['measured_absolute']:.2f}x as the whole process's ru_maxrss)"
                 if "measured_absolute" in g else "")
        lines.append(f"| {g['target']} | {g['measured']:.3f}{extra} | {'yes' if g['met'] else 'no'} |")
    lines += ["", "Search time by phase (s): notebook "
              + ", ".join(f"{k} {v:.1f}" for k, v in nb["breakdown_s"].items())
              + "; prunelab " + ", ".join(f"{k} {v:.1f}" for k, v in pl["breakdown_s"].items()) + ". "
              f"Evaluation cost per image: notebook {nb['search_eval_ms_per_image']:.2f} ms, "
              f"prunelab {pl['search_eval_ms_per_image']:.2f} ms.",
              "", f"CPU cores in use during the searches (CPU time / wall time; about {s['threads']} when the "
              f"machine is otherwise idle): notebook {s['search_cores_used']['notebook']:.2f}, "
              f"prunelab {s['search_cores_used']['prunelab']:.2f}.",
              "", f"Total benchmark wall time: {s['total_wall_s']:.0f} s.", ""]
    busy = [k for k, v in s["contended"].items() if v]
    if busy:
        lines.insert(-1, f"**Other work shared the CPU** (1-minute load average above {s['threads'] + 1}) during: "
                         f"{', '.join(busy)}; those timings are inflated.\n")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from prunelab.io import write_json, write_text

    t_start = time.perf_counter()
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="prunelab-bench-") as work:
        spec = build_spec(args, work)
        device = torch.device(spec["device"])
        torch.set_num_threads(spec["threads"])
        print(f"benchmark: {spec['arch']} on {spec['data']}, device {device}, {spec['threads']} threads", flush=True)

        train = None
        if args.weights:
            weights = {"path": str(Path(args.weights).resolve()), "source": "--weights", "epochs": None,
                       "description": f"given: {args.weights}"}
        else:
            t = train = run_child("benchmarks.procedures:child_train", spec)
            how = "reused from the fine-tune cache" if t["reused"] else f"trained in {t['seconds']:.0f} s"
            weights = {"path": t["weights"], "source": "cache" if t["reused"] else "trained",
                       "epochs": spec["epochs"], "train_overrides": t["overrides"], "cache_key": t["key"],
                       "train_seconds": None if t["reused"] else t["seconds"],
                       "description": f"{spec['arch']} from random init, {spec['epochs']} epochs with prunelab "
                                      f"(+experiment=fast, SGD lr 0.01, batch 128), {how}"}
        spec["weights"] = weights["path"]

        nb_search = run_child("benchmarks.procedures:child_notebook_search", spec)
        pl_search = run_child("benchmarks.procedures:child_prunelab_search", spec)
        runs: dict[str, list[dict]] = {k: [] for k in ("nb_lat", "pl_lat", "nb_ft", "pl_ft", "pl_ft_fast")}
        for _ in range(max(1, args.repeats)):
            runs["nb_lat"].append(run_child("benchmarks.procedures:child_notebook_latency", spec))
            runs["pl_lat"].append(run_child("benchmarks.procedures:child_prunelab_latency", spec))
            runs["nb_ft"].append(run_child("benchmarks.procedures:child_notebook_finetune", spec))
            runs["pl_ft"].append(run_child("benchmarks.procedures:child_prunelab_finetune", dict(spec, fast=False)))
            runs["pl_ft_fast"].append(run_child("benchmarks.procedures:child_prunelab_finetune", dict(spec, fast=True)))
        nb_lat, pl_lat, nb_ft, pl_ft, pl_ft_fast = (best(runs[k]) for k in runs)

    children = dict(notebook_search=nb_search, prunelab_search=pl_search, notebook_latency=nb_lat,
                    prunelab_latency=pl_lat, notebook_finetune=nb_ft, prunelab_finetune=pl_ft,
                    prunelab_finetune_fast=pl_ft_fast)
    if train is not None:
        children["train"] = train
    model_bytes = pl_search["model_bytes"]
    notebook = _section(nb_search, nb_lat, nb_ft, nb_ft, model_bytes)
    notebook["finetune_fast"] = "the notebook has one training loop: its plain loop is the baseline for both"
    prunelab = _section(pl_search, pl_lat, pl_ft, pl_ft_fast, model_bytes)
    same = bool(round(nb_search["best_ratio_contiguous"], 6) == round(pl_search["best_ratio"], 6))
    ratio = ratios(notebook, prunelab)
    date = _dt.date.today().isoformat()
    slug = device_slug(device, spec["threads"])
    report = {
        "device": slug,
        "date": date,
        "notebook": notebook,
        "prunelab": prunelab,
        "ratio": ratio,
        "same_answer": same,
        "goals": goals(notebook, prunelab, ratio, same),
        "setup": {
            "data": spec["data"] if spec["data"] == "synthetic" else f"cifar10 folder {args.data_root}",
            "val_images": pl_search["val_images"],
            "arch": spec["arch"],
            "weights": weights,
            "epochs": weights["epochs"],
            "batch_size": 128,
            "threads": spec["threads"],
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{platform.processor() or platform.machine()} ({os.cpu_count()} CPUs)",
            # The CPU's capability and bf16 support decide what +experiment=fast resolves to.
            "hardware": importlib.import_module("prunelab.hardware").detect(device.type).to_dict(),
            "fast_resolves_to": {k: v["value"] for k, v in fast_resolution(spec).items() if k != "hardware"},
            "torch": torch.__version__,
            "python": platform.python_version(),
            "prunelab": str(Path(importlib.import_module("prunelab").__file__).parent),
            "grid": spec["grid"],
            "refine_step": spec["step"],
            "tolerance": spec["tolerance"],
            "notebook_rule": spec["rule"],
            "model_bytes": model_bytes,
            "params": pl_search["params"],
            "finetune_batches": {"warmup": spec["ft_warmup"], "timed": spec["ft_batches"]},
            "latency": {"notebook": "validation loader, one sample per batch",
                        "prunelab": {"warmup": spec["latency_warmup"], "iters": spec["latency_iters"]}},
            "quick": bool(args.quick),
            "repeats": max(1, args.repeats),
            "loadavg_start": list(load_start),
            "loadavg_end": list(os.getloadavg()),
            "total_wall_s": time.perf_counter() - t_start,
            # Contention check: a compute-bound child on an otherwise idle machine uses about
            # `threads` cores (cpu_s / wall_s); much less means other work shared the CPU.
            "children": {k: {"wall_s": v["child_wall_s"], "cpu_s": v["process_cpu_s"],
                             "cores_used": v["process_cpu_s"] / v["child_wall_s"],
                             "loadavg_1min": v["loadavg_1min"]} for k, v in children.items()},
            # The 1-minute load average counts this benchmark's own `threads` busy threads; more than
            # one runnable thread beyond them at a process's start or end means it shared the CPU.
            "contended": {k: max(v["loadavg_1min"]) > spec["threads"] + 1.0 for k, v in children.items()},
            "search_cores_used": {"notebook": nb_search["search_cpu_s"] / nb_search["search_wall_s"],
                                  "prunelab": pl_search["search_cpu_s"] / pl_search["search_wall_s"]},
            "notes": [
                "search_wall_s runs from building the model to the chosen ratio (data already loaded), "
                "each procedure in its own fresh process.",
                "search_peak_rss is that process's ru_maxrss (interpreter, torch and data included); "
                "search_peak_rss_above_baseline is the peak from just before the search's model is built minus "
                "the RSS at that moment (search_rss_baseline); the memory goal uses it: " + RSS_GOAL_DEFINITION,
                "prunelab's search runs with search.full_curve=false: under the contiguous rule each phase "
                "(grid, then refinement) stops at its first failing ratio, which cannot change the answer; "
                "so its best_ratio_highest is null and it evaluates fewer candidates than the notebook.",
                "finetune_images_per_s_fast of the notebook is its one plain loop.",
                "The notebook procedure builds its model with weights=None (it used ImageNet weights, "
                "overwritten by its load_state_dict) and refines strictly between the last passing and the "
                "first failing coarse ratio (both already evaluated); l1_unstructured and prunelab may break "
                "exact magnitude ties differently (same counts).",
                "DataLoader workers start as on the platform by default (fork on Linux) in every process.",
                "prunelab's search gets the dense accuracy by evaluating the dense model itself, as the "
                "notebook does; search_images counts that pass for both.",
            ],
        },
    }
    out = Path(args.out) if args.out else DEFAULT_OUT
    stem = f"{date}-{slug}"
    write_json(out / f"{stem}.json", report)
    write_text(out / f"{stem}.md", render_markdown(report))
    print("\n" + render_markdown(report), flush=True)
    print(f"wrote {out / (stem + '.json')} and .md", flush=True)
    return report


if __name__ == "__main__":
    main()
