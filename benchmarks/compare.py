"""``python -m benchmarks.compare``: the notebook's procedure against prunelab's, in one run.

Same data, same device, same fine-tuned weights. Each measurement runs in its own fresh
process (``multiprocessing`` spawn), so peak memory is that procedure's alone and no allocator,
thread pool or autocast state leaks from one to the next. Results go to
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
import multiprocessing as mp
import os
import platform
import re
import resource
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = "../shared/data/cifar10-subset"
DEFAULT_OUT = REPO / "benchmarks" / "results"
DEFAULT_CACHE = REPO / "benchmarks" / ".cache" / "finetune"
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


# -- small pure helpers ---------------------------------------------------------------------------
def device_slug(device: torch.device, threads: int) -> str:
    """``cpu-2threads`` or the CUDA device's name, lower-case, non-alphanumerics as dashes."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"{device.type}-{threads}threads"


def result_tag(what: str, device: str, quick: bool = False) -> str:
    """``<date>-<what>-<where>[-quick]``, the stem of a benchmark's result files: ``where`` is the
    GPU's name on CUDA (``nvidia-h200``), else the device type."""
    dev = torch.device(device)
    where = device_slug(dev, 0) if dev.type == "cuda" else dev.type
    return f"{_dt.date.today().isoformat()}-{what}-{where}{'-quick' if quick else ''}"


def write_result(out: str | Path, tag: str, res: dict, render: Callable[[dict], str]) -> str:
    """A benchmark's result as ``<out>/<tag>.json`` and ``.md`` (each written atomically), the
    markdown printed as well; returns the markdown."""
    from prunelab.io import write_json, write_text

    md = render(res)
    write_json(Path(out) / f"{tag}.json", res)
    write_text(Path(out) / f"{tag}.md", md)
    print(md)
    return md


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


def _rss_now() -> int:
    """Resident bytes of this process now (Linux /proc; else the high-water mark)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _rss_peak()


def _rss_peak() -> int:
    """The process's lifetime peak RSS, ``ru_maxrss`` in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def start_peak_window() -> tuple[int, bool]:
    """The RSS now (the baseline), and whether the peak since now can be read on its own: on
    Linux, writing 5 to clear_refs resets the high-water mark (VmHWM) to the current RSS, so the
    data loading before the baseline cannot count as the search's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        reset = True
    except OSError:
        reset = False
    return _rss_now(), reset


def peak_since(baseline: int, reset: bool) -> dict:
    """Absolute ``ru_maxrss``, and the peak above ``baseline`` (from VmHWM when it was reset)."""
    absolute = _rss_peak()
    hwm = _status_bytes("VmHWM") if reset else None
    peak = hwm if hwm is not None else absolute
    return {"search_peak_rss": absolute, "search_rss_baseline": baseline,
            "search_peak_rss_above_baseline": max(0, peak - baseline),
            "search_peak_rss_above_baseline_source": "VmHWM reset at the baseline" if hwm is not None
            else "ru_maxrss (lifetime peak; may overstate)"}


# -- running one measurement in a fresh process ---------------------------------------------------
def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its reaped children (loader workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _child_entry(conn, target: str, spec: dict) -> None:
    try:
        # A spawned child inherits "spawn" as its default start method, so its DataLoader workers
        # would re-import this module at every loader iteration. Give it the platform's default
        # (fork on Linux, as the notebook's kernel had) so loaders behave as they do in a script.
        if sys.platform.startswith("linux"):
            mp.set_start_method("fork", force=True)
        torch.set_num_threads(spec["threads"])
        load = os.getloadavg()[0]
        module, name = target.split(":")
        result = getattr(importlib.import_module(module), name)(spec)
        result["process_peak_rss"] = _rss_peak()
        result["process_cpu_s"] = cpu_seconds()
        result["loadavg_1min"] = [load, os.getloadavg()[0]]
        conn.send({"ok": True, "result": result})
    except BaseException:
        conn.send({"ok": False, "error": traceback.format_exc()})
    finally:
        conn.close()


def run_child(target: str, spec: dict) -> dict:
    """Run ``module:function(spec)`` in a freshly spawned interpreter and return its dict."""
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_entry, args=(send, target, spec), daemon=False)
    t0 = time.perf_counter()
    proc.start()
    send.close()
    try:
        msg = recv.recv()
    except EOFError:
        msg = {"ok": False, "error": "the child process died without a result"}
    proc.join()
    if not msg["ok"]:
        raise RuntimeError(f"{target} failed (exit code {proc.exitcode}):\n{msg['error']}")
    result = msg["result"]
    result["child_wall_s"] = time.perf_counter() - t0
    print(f"  {target.split(':')[1]}: {result['child_wall_s']:.1f} s", flush=True)
    return result


# -- prunelab through its own config tree ---------------------------------------------------------
def compose(spec: dict, extra: list[str]):
    """Compose prunelab's ``train.yaml`` as the app does, with this run's data and paths."""
    from prunelab.compose import compose as prunelab_compose
    from prunelab.resolve import resolve_auto

    work = spec["work_dir"]
    if spec["data"] == "synthetic":
        data = ["data=synthetic", f"data.train_size={spec['train_size']}", f"data.test_size={spec['test_size']}"]
    else:
        data = [f"data.root={spec['data_root']}", "data.download=false"]
    overrides = [*data, f"model.arch={spec['arch']}", "model.weights=null", "callbacks=none", "logger=none",
                 f"trainer.accelerator={'gpu' if spec['device'].startswith('cuda') else 'cpu'}",
                 "trainer.enable_progress_bar=false", "+trainer.enable_checkpointing=false",
                 "+trainer.enable_model_summary=false", "trainer.num_sanity_val_steps=0",
                 "trainer.limit_val_batches=0", *extra]
    cfg = prunelab_compose(overrides, work)
    resolve_auto(cfg)  # +experiment=fast's "auto" settings become what this machine runs fastest
    return cfg


def _datamodule(cfg):
    from hydra.utils import instantiate

    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _trainer(cfg, callbacks):
    from lightning import Trainer
    from omegaconf import OmegaConf

    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    kwargs.pop("_target_")
    return Trainer(**kwargs, callbacks=callbacks, logger=False)


def _classifier(cfg, weights_path: str | None):
    from hydra.utils import instantiate

    from prunelab.io import load_state_dict

    module = instantiate(cfg.model)
    if weights_path:
        state = load_state_dict(weights_path)
        module.net.load_state_dict(state, strict=True)
        del state
    return module


def fast_resolution(spec: dict) -> dict:
    """What +experiment=fast's "auto" settings resolve to on this machine (for the results)."""
    from prunelab.compose import compose as prunelab_compose
    from prunelab.resolve import resolve_auto

    return resolve_auto(prunelab_compose(["+experiment=fast", "data=synthetic"], spec["work_dir"]))


def child_train(spec: dict) -> dict:
    """Fine-tune with prunelab (or reuse its cache) and return the dense.pt path."""
    import lightning as L

    from prunelab.finetune import finetune

    cfg = compose(spec, [*spec["train_overrides"], f"trainer.max_epochs={spec['epochs']}",
                         f"finetune.cache={'true' if spec['cache_dir'] else 'false'}",
                         f"finetune.cache_dir={spec['cache_dir'] or Path(spec['work_dir']) / 'cache'}"])
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = _datamodule(cfg)
    module = _classifier(cfg, None)
    trainer = _trainer(cfg, [])
    ft = finetune(cfg, trainer, module, dm)
    path = Path(ft.source) if ft.reused else None
    if path is None:
        from prunelab.io import save_state_dict

        path = Path(cfg.finetune.cache_dir) / ft.key / "dense.pt" if spec["cache_dir"] else \
            save_state_dict(Path(spec["work_dir"]) / "dense.pt", module.net.state_dict())
    return {"weights": str(path), "reused": ft.reused, "seconds": ft.seconds, "key": ft.key,
            "overrides": spec["train_overrides"] + [f"trainer.max_epochs={spec['epochs']}"]}


def _timers() -> dict:
    """Wrap the search's phases with timers (instrumentation only; nothing else changes)."""
    import prunelab.search.oneshot as cb
    from prunelab.pruning.magnitude import MagnitudePruner

    timer: dict = {"evaluate": 0.0, "rank_and_copy": 0.0, "mask": 0.0, "stats": 0.0, "evaluate_calls_s": []}

    def wrap(fn, key):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timer[key] += time.perf_counter() - t0
                if key == "evaluate":
                    timer["evaluate_calls_s"].append(time.perf_counter() - t0)
        return timed

    cb.count_correct = wrap(cb.count_correct, "evaluate")
    MagnitudePruner.prepare = wrap(MagnitudePruner.prepare, "rank_and_copy")
    MagnitudePruner.apply = wrap(MagnitudePruner.apply, "mask")
    MagnitudePruner.stats = wrap(MagnitudePruner.stats, "stats")
    return timer


def child_prunelab_search(spec: dict) -> dict:
    """prunelab's search, layerwise like the notebook, rule contiguous, default early stop."""
    from prunelab.callbacks import RatioSearch

    cfg = compose(spec, [])
    dm = _datamodule(cfg)
    device = torch.device(spec["device"])
    timer = _timers()
    baseline, reset = start_peak_window()  # right before the search's model is built
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    module = _classifier(cfg, spec["weights"])
    net = module.net.to(device)
    timer["build_and_load"] = time.perf_counter() - t0
    # full_curve=False: each phase stops at its first failure, which cannot change the contiguous
    # answer (the notebook's side evaluates its whole curve; same_answer compares contiguous answers).
    searcher = RatioSearch(tolerance=spec["tolerance"], rule="contiguous", grid=spec["grid"],
                           refine_step=spec["step"], scope="layerwise", exact=False,
                           batch_size=dm.eval_batch_size, precision=str(cfg.trainer.precision), full_curve=False,
                           fast_eval=True)  # NHWC, and VGG's pool folded at 32x32: same function, faster
    result = searcher.run(net, dm.val_set, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    memory = peak_since(baseline, reset)
    d = result.to_dict()
    curve = [{k: c[k] for k in ("ratio", "val_acc", "acc_is_bound", "seen", "passed")} for c in d["curve"]]
    return {
        "search_wall_s": wall,
        "search_cpu_s": cpu,
        "search_images": len(dm.val_set) + sum(c["seen"] for c in curve),
        **memory,
        "search_peak_device_mem": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "model_bytes": sum(p.numel() * p.element_size() for p in net.parameters()),
        "params": sum(p.numel() for p in net.parameters()),
        "dense_acc": d["dense_val_acc"],
        "best_ratio": d["best_ratio"],
        "best_ratio_highest": d["best_ratio_highest"],  # None: the curve stopped at the first failure
        "full_curve": d["full_curve"],
        "candidates": len(curve),
        "curve": curve,
        "breakdown_s": {k: v for k, v in timer.items() if k != "evaluate_calls_s"},
        "evaluate_calls_s": timer["evaluate_calls_s"],
        "val_images": len(dm.val_set),
    }


def child_notebook_search(spec: dict) -> dict:
    from benchmarks import notebook_procedure as nb

    cfg = compose(spec, [])
    dm = _datamodule(cfg)
    device = torch.device(spec["device"])
    baseline, reset = start_peak_window()  # nb.search builds its model first
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    out = nb.search(spec["arch"], spec["weights"], dm.val_set, device, spec["grid"], spec["step"],
                    spec["tolerance"], spec["rule"], num_workers=spec["num_workers"])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    out.update(search_wall_s=wall, search_cpu_s=cpu, search_images=out.pop("images"), **peak_since(baseline, reset),
               search_peak_device_mem=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None)
    return out


def child_notebook_latency(spec: dict) -> dict:
    from benchmarks import notebook_procedure as nb

    dm = _datamodule(compose(spec, []))
    return nb.latency(spec["arch"], spec["weights"], dm.val_set, torch.device(spec["device"]),
                      num_workers=spec["num_workers"])


def child_prunelab_latency(spec: dict) -> dict:
    from prunelab.latency import sample_batch, summarize, time_forward

    cfg = compose(spec, [])
    dm = _datamodule(cfg)
    device = torch.device(spec["device"])
    net = _classifier(cfg, spec["weights"]).net.to(device)
    batch = sample_batch(dm.val_set, cfg.latency.batch_size)
    samples = time_forward(net, batch, device, warmup=spec["latency_warmup"], iters=spec["latency_iters"],
                           include_transfer=bool(cfg.latency.include_transfer))
    stats = summarize(samples, batch.shape[0])
    return {"p50_ms": stats["p50"], "p90_ms": stats["p90"], "p99_ms": stats["p99"], "iters": stats["iters"],
            "warmup": spec["latency_warmup"], "batch_size": stats["batch_size"],
            "method": "prunelab.latency.time_forward: batch on device, warm-up, device sync"}


def child_notebook_finetune(spec: dict) -> dict:
    from benchmarks import notebook_procedure as nb

    dm = _datamodule(compose(spec, []))
    return nb.finetune_throughput(spec["arch"], spec["weights"], dm.train_set, torch.device(spec["device"]),
                                  spec["ft_warmup"], spec["ft_batches"], num_workers=spec["num_workers"])


def child_prunelab_finetune(spec: dict) -> dict:
    """Lightning Trainer + ImageClassifier + the datamodule, prunelab's config (``spec['fast']``
    adds ``+experiment=fast``), for warm-up + timed batches; startup is not timed."""
    from lightning import Callback

    warm, n = spec["ft_warmup"], spec["ft_batches"]
    device = torch.device(spec["device"])

    class BatchClock(Callback):
        def __init__(self):
            self.ends: list[float] = []
            self.sizes: list[int] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.ends.append(time.perf_counter())
            self.sizes.append(int(batch[1].shape[0]))

    extra = ["+experiment=fast"] if spec["fast"] else []
    cfg = compose(spec, [*extra, "trainer.max_epochs=1", f"trainer.limit_train_batches={warm + n}"])
    dm = _datamodule(cfg)
    module = _classifier(cfg, spec["weights"])
    clock = BatchClock()
    trainer = _trainer(cfg, [clock])
    trainer.fit(module, datamodule=dm)
    if len(clock.ends) < warm + n:
        raise RuntimeError(f"only {len(clock.ends)} training batches ran, wanted {warm + n}")
    seconds = clock.ends[warm + n - 1] - (clock.ends[warm - 1] if warm else clock.ends[0])
    seen = sum(clock.sizes[warm:warm + n]) if warm else sum(clock.sizes[1:n])
    return {"images_per_s": seen / seconds, "images": seen, "seconds": seconds, "warmup_batches": warm,
            "precision": str(cfg.trainer.precision), "channels_last": bool(cfg.model.channels_last),
            "on_device": bool(cfg.data.on_device), "num_workers": int(cfg.data.num_workers)}


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
            t = train = run_child("benchmarks.compare:child_train", spec)
            how = "reused from the fine-tune cache" if t["reused"] else f"trained in {t['seconds']:.0f} s"
            weights = {"path": t["weights"], "source": "cache" if t["reused"] else "trained",
                       "epochs": spec["epochs"], "train_overrides": t["overrides"], "cache_key": t["key"],
                       "train_seconds": None if t["reused"] else t["seconds"],
                       "description": f"{spec['arch']} from random init, {spec['epochs']} epochs with prunelab "
                                      f"(+experiment=fast, SGD lr 0.01, batch 128), {how}"}
        spec["weights"] = weights["path"]

        nb_search = run_child("benchmarks.compare:child_notebook_search", spec)
        pl_search = run_child("benchmarks.compare:child_prunelab_search", spec)
        runs: dict[str, list[dict]] = {k: [] for k in ("nb_lat", "pl_lat", "nb_ft", "pl_ft", "pl_ft_fast")}
        for _ in range(max(1, args.repeats)):
            runs["nb_lat"].append(run_child("benchmarks.compare:child_notebook_latency", spec))
            runs["pl_lat"].append(run_child("benchmarks.compare:child_prunelab_latency", spec))
            runs["nb_ft"].append(run_child("benchmarks.compare:child_notebook_finetune", spec))
            runs["pl_ft"].append(run_child("benchmarks.compare:child_prunelab_finetune", dict(spec, fast=False)))
            runs["pl_ft_fast"].append(run_child("benchmarks.compare:child_prunelab_finetune", dict(spec, fast=True)))
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
