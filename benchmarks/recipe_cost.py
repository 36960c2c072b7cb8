"""What the from-scratch recipe (``+experiment=scratch``) costs on this machine, and what it reaches.

1. Training speed: a number of the recipe's optimiser steps on real batches of the class-folder data,
   with the recipe's ``auto`` settings resolved for this machine (bf16 autocast where native, the
   classifier folded at 32x32), the same steps unfolded (``model.fold_classifier=false``) and in
   float32 NCHW (``trainer.precision=32-true model.channels_last=false``) and compiled
   (``model.compile=true``, which ``auto`` turns on for CUDA alone; its compile falls in the skipped
   steps), in one process, in turns
   (``--rounds`` rounds, each a short fit of every variant); steady images/s (the first ``--skip``
   steps of each fit left out), then the seconds a 40,000-image epoch, and the hours a 10-epoch
   budget and the recipe's own ``trainer.max_epochs`` take at that rate.
2. With ``--run DIR [DIR ...]`` (a run of the recipe, finished or in progress; a run resumed into
   new folders is its folders in order): its validation accuracy after each epoch, from each
   folder's ``csv/metrics.csv`` (a later folder's epoch replaces an earlier one's), and, once it
   finished, its test accuracy, from the last folder's ``report.json`` (else its metrics).
   ``--rounds 0 --run DIR`` reads the run alone (no timing); ``--label`` names the result apart.

    python -m benchmarks.recipe_cost --data-root ../shared/data/cifar10-jpeg [--steps 30] [--run RUN_DIR]

Results: benchmarks/results/<date>-recipe-cost-<device>.{json,md}, with the CPU's flags and the load
average (other work on the machine slows training: a figure taken under load says so).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import DEFAULT_OUT, REPO, result_tag, write_result
from prunelab import hardware
from prunelab.report.markdown import table

EPOCH_IMAGES = 40_000
VARIANTS = {"recipe (auto)": [], "unfolded": ["model.fold_classifier=false"],
            "float32 NCHW": ["trainer.precision=32-true", "model.channels_last=false"],
            # What model.compile=auto leaves out on a CPU: does a compiled step repay its compile?
            "compiled": ["model.compile=true", "model.compile_mode=default"]}


def timed_fit(overrides: list[str], steps: int, skip: int, work: Path) -> dict:
    """One short fit of the recipe: the gaps between its optimiser steps after the first ``skip``."""
    import lightning as L
    from lightning import Callback

    from prunelab.compose import compose
    from prunelab.resolve import resolve_auto
    from prunelab.trainer import build, build_trainer

    cfg = compose(["+experiment=scratch", "data=imagefolder", *overrides, f"trainer.limit_train_batches={steps}",
                   "trainer.max_epochs=1", "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
                   "callbacks=none", "logger=none", "trainer.enable_progress_bar=false", "finetune.cache=false"], work)
    resolved = resolve_auto(cfg)
    L.seed_everything(cfg.seed, verbose=False)
    dm, module = build(cfg.data, "data"), build(cfg.model, "model")
    dm.setup("fit")
    stamps: list[float] = []

    class Stamp(Callback):
        def on_train_batch_end(self, *a, **k):
            stamps.append(time.perf_counter())

    trainer = build_trainer(cfg, enable_model_summary=False)
    trainer.callbacks.append(Stamp())
    trainer.fit(module, datamodule=dm)
    gaps = [b - a for a, b in zip(stamps[skip:], stamps[skip + 1:], strict=False)]
    return {"precision": str(cfg.trainer.precision), "channels_last": bool(cfg.model.channels_last),
            "fold_classifier": bool(cfg.model.get("fold_classifier", False)), "compile": bool(cfg.model.compile),
            "batch_size": int(cfg.data.batch_size), "gaps": gaps,
            "resolved": {k: v.get("reason") for k, v in resolved.items() if k.startswith(("trainer", "model"))}}


def speeds_in_turns(data: list[str], steps: int, skip: int, rounds: int, work: Path) -> dict:
    """Every variant's steady rate, its fits taken in turns (round after round), so a change in the
    machine's load falls on all of them alike."""
    fits: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for r in range(rounds):
        for name, extra in VARIANTS.items():
            fits[name].append(timed_fit([*data, *extra], steps, skip, work / f"{name.split()[0]}-{r}"))
    out = {}
    for name, runs in fits.items():
        gaps = [g for run in runs for g in run["gaps"]]
        step_s = statistics.median(gaps)
        first = {k: v for k, v in runs[0].items() if k != "gaps"}
        out[name] = {**first, "rounds": rounds, "steps_timed": len(gaps), "median_step_s": step_s,
                     "images_per_s": first["batch_size"] / step_s}
    return out


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        raise SystemExit(f"--run {run_dir}: no csv/metrics.csv there (point it at a run folder of the recipe)")
    with open(path) as fh:
        return list(csv.DictReader(fh))


def val_curve(*run_dirs: Path) -> list[dict]:
    """(epoch, val accuracy %) after each finished epoch of a run, from its folders' csv/metrics.csv
    in order: a resumed run's folder holds the epochs from where it resumed, and replaces them."""
    by_epoch = {}
    for run_dir in run_dirs:
        for row in _metrics(run_dir):
            if row.get("val/acc"):
                by_epoch[int(row["epoch"]) + 1] = 100 * float(row["val/acc"])
    return [{"epoch": e, "val_acc": v} for e, v in sorted(by_epoch.items())]


def test_accuracy(run_dir: Path) -> float | None:
    """The finished run's test accuracy %: its report's (the run's own figure), else the last
    test/acc its metrics logged; None before its test pass."""
    report = run_dir / "report.json"
    if report.is_file():
        test = (json.loads(report.read_text()).get("dense") or {}).get("test_acc")
        if test:
            return float(test["value"])
    values = [100 * float(row["test/acc"]) for row in _metrics(run_dir) if row.get("test/acc")]
    return values[-1] if values else None


def recipe_epochs() -> int:
    """How many epochs ``+experiment=scratch`` trains for: its config is the one source of that length."""
    from prunelab.compose import compose

    with tempfile.TemporaryDirectory() as tmp:
        return int(compose(["+experiment=scratch"], tmp).trainer.max_epochs)


def measure(args) -> dict:
    data = [f"data.root={(REPO / args.data_root).resolve()}", f"data.cache_dir={REPO / 'benchmarks' / '.cache' / 'imagefolder'}"]
    load_start = os.getloadavg()
    hw = hardware.detect("cpu")
    res = {
        "what": "the from-scratch recipe's training speed on this machine, and its validation accuracy per epoch",
        "date": dt.date.today().isoformat(), "machine": {**hw.to_dict(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                                                          "threads": torch.get_num_threads(), "torch": torch.__version__},
    }
    if args.rounds > 0:
        with tempfile.TemporaryDirectory() as tmp:
            speeds = speeds_in_turns(data, args.steps, args.skip, args.rounds, Path(tmp))
        rate = speeds["recipe (auto)"]["images_per_s"]
        res.update({
            "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg()),
            "speeds": speeds, "bf16_vs_fp32": rate / speeds["float32 NCHW"]["images_per_s"],
            "folded_vs_unfolded": rate / speeds["unfolded"]["images_per_s"],
            "compiled_vs_eager": speeds["compiled"]["images_per_s"] / rate,
            "epoch_s": EPOCH_IMAGES / rate,
            "budget_h": {str(e): e * EPOCH_IMAGES / rate / 3600 for e in sorted({10, recipe_epochs()})},
        })
    if args.run:
        runs = [Path(r) for r in args.run]
        res["run"] = ", ".join(map(str, runs))
        res["val_curve"] = val_curve(*runs)
        res["test_acc"] = test_accuracy(runs[-1])
    return res


def render(res: dict) -> str:
    m = res["machine"]
    flags = (f"Machine: {m.get('name')} ({m['cpu_capability']}, flags {', '.join(m.get('cpu_flags') or [])}, native bf16: "
             f"{m.get('native_bf16')}), torch {m['torch']}, {m['threads']} threads")
    if "speeds" not in res:
        return "\n".join([f"# The from-scratch recipe's run ({res['date']})", "", flags + ".", "", *_run_lines(res)])
    loaded = max(res["loadavg_start"][0], res["loadavg_end"][0]) > m["threads"] + 0.5
    rows = [(k, v["precision"], str(v["channels_last"]), str(v.get("fold_classifier", "-")), str(v.get("compile", "-")),
             f"{v['images_per_s']:.1f}", f"{v['median_step_s']:.3f}") for k, v in res["speeds"].items()]
    lines = [f"# The from-scratch recipe's cost ({res['date']})", "",
             f"{flags}; 1-minute load average "
             f"{res['loadavg_start'][0]:.2f} at start, {res['loadavg_end'][0]:.2f} at end"
             + (" (**other work shared the CPU: the rates are lower bounds**)." if loaded else "."), "",
             table(["variant", "precision", "channels_last", "fold_classifier", "compile", "images/s", "median step s"], rows),
             "",
             f"Variants timed in turns: {res['speeds']['recipe (auto)'].get('rounds', 1)} rounds of short fits, the "
             "median gap between optimiser steps.", "",
             f"The recipe at this rate: {res['epoch_s'] / 60:.1f} min per 40,000-image epoch, "
             + ", ".join(f"{h:.1f} h for {e} epochs" for e, h in res["budget_h"].items())
             + f" (validation adds about a quarter of an epoch's forward passes). bf16 vs float32: {res['bf16_vs_fp32']:.2f}x; "
             + (f"folded vs unfolded classifier: {res['folded_vs_unfolded']:.2f}x." if "folded_vs_unfolded" in res else "")
             + (f" Compiled vs eager steps: {res['compiled_vs_eager']:.2f}x (compile time not counted)."
                if "compiled_vs_eager" in res else ""), ""]
    return "\n".join(lines + _run_lines(res))


def _run_lines(res: dict) -> list[str]:
    if not res.get("val_curve"):
        return []
    rows = [(str(c["epoch"]), f"{c['val_acc']:.2f}") for c in res["val_curve"]]
    test = res.get("test_acc")
    return [f"Validation accuracy after each epoch of `{res['run']}`:", "", table(["epoch", "val acc %"], rows), "",
            f"Test accuracy at the end: {test:.2f}%." if test is not None else "Not finished: no test accuracy yet.", ""]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default="../shared/data/cifar10-jpeg")
    p.add_argument("--steps", type=int, default=14, help="optimiser steps per fit")
    p.add_argument("--rounds", type=int, default=3, help="fits of every variant, taken in turns")
    p.add_argument("--skip", type=int, default=5, help="first steps left out of the rate")
    p.add_argument("--run", nargs="+", default=None,
                   help="a run folder of the recipe (a resumed run: its folders in order): its validation "
                        "accuracy per epoch and its test accuracy")
    p.add_argument("--label", default=None, help="a suffix for the result files' names")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    if args.rounds < 0 or (args.rounds == 0 and not args.run):
        p.error("--rounds must be >= 1, or 0 with --run RUN_DIR (read the run alone)")
    if args.steps < args.skip + 3:
        p.error(f"--steps {args.steps} must exceed --skip {args.skip} by at least 3")
    res = measure(args)
    tag = result_tag("recipe-cost", "cpu") + (f"-{args.label}" if args.label else "")
    write_result(args.out, tag, res, render)
    return res


if __name__ == "__main__":
    main()
