"""A model worth pruning: the fastest model within tolerance, found on a VGG16 trained to CIFAR-10
accuracy rather than on a few minutes of a subset.

1. The dense model: trained by the recipe (``+experiment=scratch data=imagefolder``, cached by the
   fine-tune cache), or ``--weights dense.pt`` trained elsewhere (``--folded`` for a state_dict whose
   ``classifier.0.weight`` is stored folded for 32x32 inputs, 4096 x 512: it is unfolded exactly).
2. For each ``--schedules`` entry, prunelab's own command: ``search.objective=latency`` across
   magnitude, channel, 2:4 and channel+2:4 with ``search.confidence=0.95``, timed at batch 128 and 1;
   its report (json, md, the accuracy-vs-latency plot) is copied under the results folder.
3. In one process, every model taking turns each iteration (``benchmarks.fastest.time_answers``): the
   dense model as the notebook runs it (eager fp32, NCHW), the dense deploy form, the one-shot
   latency answer, the iterative run's recovered answer (loaded from the model that run saved) and
   each method's sparsity answer, at batch 128 and at batch 1. The goals judge the fastest answer.

    python -m benchmarks.worthy --data-root ../shared/data/cifar10-jpeg [--weights PATH [--folded]]
        [--device cpu|cuda] [--schedules oneshot iterative] [--iterative-set KEY=VALUE ...] [--seed 0] [--quick]

Results: benchmarks/results/<date>-worthy-<device>[-seed<S>].{json,md} and a folder of the same stem
holding each schedule's report. ``--quick`` writes a tree of generated class folders and runs a
2-epoch ResNet-18 through the same steps (a smoke test of the benchmark itself).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from benchmarks.common import DEFAULT_OUT, REPO, result_tag, write_result
from benchmarks.fastest import beats_sparsity, rebuild_options, time_answers
from prunelab import hardware
from prunelab.compose import compose
from prunelab.io import load_state_dict, save_state_dict
from prunelab.models.factory import build_from_state_dict, unfold_classifier
from prunelab.pipeline import run
from prunelab.pruning.channel_files import load_compact
from prunelab.report.markdown import table

CACHE = REPO / "benchmarks" / ".cache"
METHODS = "[magnitude,channel,semi_structured,channel+semi_structured]"
# The goals: GPU (H100/H200) and a native-bf16 CPU.
GOALS = {"cuda": {"vs_notebook": 10.0, "vs_dense_deploy": 1.8, "job_s": 600.0}, "cpu": {"vs_notebook": 8.0}}


def unfold(path: str, out: Path) -> Path:
    """A VGG16 state_dict whose ``classifier.0.weight`` is folded for 32x32 inputs (4096 x 512: the
    average pool repeats each channel 49 times, so the 49 columns of a channel act as their sum) back
    in torchvision's layout (4096 x 25088), exactly for 32x32 inputs, in float32."""
    sd = {k: v.float() for k, v in torch.load(path, map_location="cpu", weights_only=True).items()}
    return save_state_dict(out, unfold_classifier(sd, 512 * 49))


def quick_tree(root: Path) -> Path:
    """Generated class folders (three colours, noisy), train/val/test, for --quick."""
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}
    for split, n in {"train": 40, "val": 10, "test": 10}.items():
        for c, rgb in colours.items():
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for j in range(n):
                px = np.clip(np.array(rgb) + rng.integers(-30, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(root / split / c / f"{j:04d}.png")
    return root


def overrides(args, data_root: Path, weights: Path | None, work: Path) -> list[str]:
    """The user's command, as the README's how-to gives it, plus where this benchmark keeps its runs."""
    over = ["+experiment=scratch", "data=imagefolder", f"data.root={data_root}", f"seed={args.seed}",
            f"paths.root_dir={work}", f"finetune.cache_dir={CACHE / 'finetune'}",
            f"data.cache_dir={CACHE / 'imagefolder'}", "search.objective=latency", f"search.methods={METHODS}",
            "search.confidence=0.95", "latency.batch_sizes=[1,128]", "latency.batch_size=128",
            f"trainer.accelerator={'gpu' if args.device.startswith('cuda') else 'cpu'}",
            "trainer.enable_progress_bar=false"]
    if weights is not None:
        over.append(f"finetune.weights_path={weights}")
    if args.quick:
        over += ["model=resnet18", "model.num_classes=3", "trainer.max_epochs=2", "data.batch_size=32",
                 "search.grid=[0.3,0.6]", "search.refine_step=null", "latency.batch_sizes=[1,8]",
                 "latency.batch_size=8", "latency.iters=3", "latency.warmup=1", "latency.agreement_images=8",
                 "prune.recover_epochs=1", "search.tolerance=50", "search.allow_weak_model=true"]
    elif args.epochs:
        over.append(f"trainer.max_epochs={args.epochs}")
    return over + list(args.set)


def served_answer(report: dict, models_dir: Path) -> tuple | None:
    """(network, method, ratio) of the model a run chose and saved, or None when it kept the dense one."""
    chosen = (report.get("search") or {}).get("chosen")
    if not chosen:
        return None
    net = load_compact(models_dir)
    if net is None:
        net = build_from_state_dict(report["config"]["model"]["arch"], load_state_dict(models_dir / "pruned.pt"))
    return net, chosen["method"], chosen["ratio"]


def rebuilt_answers(runs: dict) -> tuple[dict, dict]:
    """(search, options) of the answers rebuilt from the dense weights: the one-shot search's choice and
    each method's sparsity answer, cut under that run's options. Without a one-shot run there are none:
    an iterative run's ratios are recovered models', which a cut of the dense weights is not."""
    oneshot = runs.get("oneshot")
    if oneshot is None:
        return {"chosen": None, "best_ratio_by_method": {}}, {}
    return oneshot["report"]["search"], rebuild_options(oneshot["report"])


def fastest_answer(speedups: dict) -> str | None:
    """The fastest model a search chose (one-shot, or a schedule's recovered answer), as timed in turns."""
    tags = [t for t in speedups if t.endswith("_search_deploy")]  # latency_search_deploy, iterative_search_deploy
    return max(tags, key=speedups.__getitem__) if tags else None


def _copy_report(run_dir: Path, dest: Path) -> list[str]:
    """report.json, report.md and the plots of a run, copied (the run's models stay behind)."""
    dest.mkdir(parents=True, exist_ok=True)
    kept = []
    for f in sorted(run_dir.iterdir()):
        if f.name in ("report.json", "report.md") or f.suffix == ".png":
            shutil.copy2(f, dest / f.name)
            kept.append(f.name)
    return kept


def measure(args) -> dict:
    device = torch.device(args.device)
    tag = result_tag("worthy", args.device, args.quick) + (f"-seed{args.seed}" if args.seed else "") + \
        (f"-{args.label}" if args.label else "")
    out = Path(args.out)
    t_job = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data_root = quick_tree(work / "tree") if args.quick else (REPO / args.data_root).resolve()
        weights = None
        if args.weights:
            weights = unfold(args.weights, work / "dense.pt") if args.folded else Path(args.weights).resolve()
        if "oneshot" in args.schedules:  # answers this benchmark cannot rebuild fail now, not after the searches
            check = compose(overrides(args, data_root, weights, work / "check") + ["prune.schedule=oneshot"], work / "check")
            rebuild_options({"config": OmegaConf.to_container(check, resolve=True)})
        runs = {}
        for schedule in args.schedules:
            over = overrides(args, data_root, weights, work / schedule) + [f"prune.schedule={schedule}"] + \
                (list(args.iterative_set) if schedule == "iterative" else [])
            cfg = compose(over, work / schedule)
            t0 = time.perf_counter()
            report = run(cfg)
            wall = time.perf_counter() - t0
            run_dir = Path(cfg.paths.output_dir)
            files = _copy_report(run_dir, out / tag / schedule)
            runs[schedule] = {"report": report, "wall_s": wall, "files": files,
                              "dense": run_dir / "models" / "dense.pt", "command": over,
                              "answer": served_answer(report, run_dir / "models")}
            # the fine-tune of the first schedule is the cached start of the next
            print(f"worthy: {schedule} search done in {wall:.0f} s", flush=True)
        first = runs[args.schedules[0]]
        dense_sd = load_state_dict(first["dense"])
        arch = first["report"]["config"]["model"]["arch"]
        timed = {}
        head = runs["oneshot" if "oneshot" in runs else args.schedules[0]]["report"]
        # served as the search served them: the runtime auto picked (or the one named)
        runtime = (head.get("runtime_choice") or {}).get("chosen") or head["config"]["latency"]["runtime"]
        rebuilt, options = rebuilt_answers(runs)
        # a recovered answer cannot be rebuilt from the dense weights: its run's saved model is timed
        built = {f"{name}_search": r["answer"] for name, r in runs.items() if name != "oneshot" and r["answer"]}
        for b in args.batch_sizes:
            timed[b] = time_answers(dense_sd, rebuilt, device, args.iters, options, arch=arch, batch_size=b,
                                    runtime=runtime, built=built)
    job_s = time.perf_counter() - t_job
    return summarise(args, tag, runs, timed, job_s, device)


def summarise(args, tag: str, runs: dict, timed: dict, job_s: float, device: torch.device) -> dict:
    hw = hardware.detect(device.type)
    first = runs[args.schedules[0]]["report"]
    dense = first["dense"]
    per_schedule = {}
    for schedule, r in runs.items():
        rep = r["report"]
        s = rep["search"]
        per_schedule[schedule] = {
            "chosen": s.get("chosen"), "best_ratio_by_method": s.get("best_ratio_by_method"),
            "pruned_test_acc": rep.get("pruned", {}).get("test_acc"), "pruned_val_acc": rep.get("pruned", {}).get("val_acc"),
            # the report's one number for this model (value, paired 5-95%, verdict, where it was measured)
            "speedup_vs_dense_deploy": rep.get("pruned", {}).get("speedup"),
            "latency": {k: v for k, v in (rep.get("latency") or {}).items() if k not in ("samples",)},
            "wall_s": r["wall_s"], "timing_s": rep["timing_s"], "report_files": r["files"],
            "command": "python -m prunelab.train " + " ".join(a for a in r["command"]
                                                               if not a.startswith(("paths.", "finetune.cache_dir",
                                                                                    "data.cache_dir")))}
    comparison = {}
    for b, t in timed.items():
        comparison[str(b)] = {
            "answers": {k: list(v) for k, v in t["answers"].items()},
            "latency_ms_p50": {k: float(torch.tensor(v).median()) for k, v in t["samples"].items()},
            "speedup_vs_notebook_dense": t["speedups"],
            "paired_5_95": {k: [r["paired_ratio"]["p5"], r["paired_ratio"]["p95"]] for k, r in t["vs_notebook"].items()},
            "deploy": {"runtime": t["runtime"], "dtype": str(t["dtype"]), "channels_last": t["layout"]},
            "beats_best_sparsity_answer": beats_sparsity(*as_latency_answer(t)) if "oneshot" in runs else {
                "measured": None, "met": False,
                "why": "not measured: the oneshot schedule gives each method's sparsity answer"},
        }
    head = comparison.get("128") or next(iter(comparison.values()))
    sp = head["speedup_vs_notebook_dense"]
    best = fastest_answer(sp)
    lat = sp.get(best) if best else None
    vs_deploy = (lat / sp["dense_deploy"]) if lat and sp.get("dense_deploy") else None
    kind = "cuda" if device.type == "cuda" else "cpu"
    g = GOALS[kind]
    goals = {
        "dense test accuracy >= 88%": {"measured": dense["test_acc"]["value"], "met": dense["test_acc"]["value"] >= 88.0},
        f"chosen >= {g['vs_notebook']}x the notebook's dense model (batch 128)": {
            "measured": lat, "met": bool(lat and lat >= g["vs_notebook"])},
        "chosen faster than the best single-method sparsity answer": head["beats_best_sparsity_answer"],
    }
    if best:
        goals[f"chosen >= {g['vs_notebook']}x the notebook's dense model (batch 128)"]["model"] = \
            [best.removesuffix("_deploy"), *head["answers"][best.removesuffix("_deploy")]]
    if kind == "cuda":
        goals[f"chosen >= {g['vs_dense_deploy']}x the dense deploy form"] = {
            "measured": vs_deploy, "met": bool(vs_deploy and vs_deploy >= g["vs_dense_deploy"])}
        goals[f"whole job <= {g['job_s']:.0f} s"] = {"measured": job_s, "met": job_s <= g["job_s"]}
    return {
        "what": "the fastest model within tolerance on a model worth pruning (VGG16, CIFAR-10 JPEG class folders)",
        "date": dt.date.today().isoformat(), "machine": {**hw.to_dict(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                                                          "threads": torch.get_num_threads(), "torch": torch.__version__},
        "device": str(device), "quick": args.quick, "seed": args.seed,
        "weights": ("trained elsewhere: " + args.weights + (" (folded, unfolded here)" if args.folded else ""))
        if args.weights else "trained here by +experiment=scratch",
        "finetune": first["finetune"], "dense": {k: dense[k] for k in ("val_acc", "test_acc")},
        "schedules": per_schedule, "comparison_by_batch": comparison, "job_s": job_s, "goals": goals, "tag": tag,
    }


def as_latency_answer(t: dict) -> tuple[dict, dict, dict]:
    """(answers, speedups, samples) with the fastest search answer under ``latency_search``: the
    goal judges what prunelab would hand the user, one-shot or recovered."""
    best = fastest_answer(t["speedups"])
    answers, speedups, samples = dict(t["answers"]), dict(t["speedups"]), dict(t["samples"])
    if best and best != "latency_search_deploy":
        answers["latency_search"] = answers[best.removesuffix("_deploy")]
        speedups["latency_search_deploy"], samples["latency_search_deploy"] = speedups[best], samples[best]
    return answers, speedups, samples


def render(res: dict) -> str:
    m = res["machine"]
    lines = [f"# A model worth pruning ({res['date']})", "",
             f"Machine: {m.get('name')} ({m['cpu_capability']}, flags {', '.join(m.get('cpu_flags') or []) or '-'}, "
             f"native bf16: {m.get('native_bf16')}), torch {m['torch']}, {m['threads']} threads; device {res['device']}.",
             f"Dense model: {res['weights']}; val {res['dense']['val_acc']['value']:.2f}%, "
             f"test {res['dense']['test_acc']['value']:.2f}% (n={res['dense']['test_acc']['n']}).", ""]
    for schedule, s in res["schedules"].items():
        c = s["chosen"]
        what = f"{c['method']} {c['ratio']:.2f}" if c else "dense (nothing faster within the tolerance)"
        acc = s["pruned_test_acc"]
        lines += [f"## {schedule}: {what}", "",
                  f"Test accuracy {acc['value']:.2f}%; " if acc else "",
                  f"search and report in {s['wall_s']:.0f} s; each method's highest ratio within the tolerance: "
                  f"{s['best_ratio_by_method']}. Report: `{res['tag']}/{schedule}/report.md`.", "",
                  f"    {s['command']}", ""]
    for b, comp in res["comparison_by_batch"].items():
        rows = [(t, f"{comp['latency_ms_p50'][t]:.2f}", f"{comp['speedup_vs_notebook_dense'].get(t, 1.0):.2f}x",
                 "-" if t == "dense_eager_fp32_nchw" else "{:.2f}-{:.2f}".format(*comp["paired_5_95"][t]),
                 " / ".join(str(v) for v in comp["answers"].get(t.removesuffix("_deploy"), [])) or "-")
                for t in comp["latency_ms_p50"]]
        lines += [f"## Batch {b}, every model in turns (served in {comp['deploy']['runtime']}, "
                  f"{comp['deploy']['dtype']}, channels_last={comp['deploy']['channels_last']}; the notebook's "
                  "dense model in eager fp32 NCHW)", "",
                  table(["model", "p50 ms", "vs notebook dense", "paired 5-95%", "method / ratio"], rows), ""]
    goals = [(k, _measured(v["measured"]), ("met" if v["met"] else "NOT met") + (f": {v['why']}" if v.get("why") else ""))
             for k, v in res["goals"].items()]
    lines += ["## Goals", "", table(["goal", "measured", ""], goals), "", f"Whole job: {res['job_s']:.0f} s.", ""]
    # A result corrected after it was measured keeps its rows and says what in them is void; notes
    # say what its figures mean beside earlier runs. Both live in the json, so a re-render keeps them.
    notes = ([f"Correction: {res['correction']}"] if res.get("correction") else []) + list(res.get("notes", []))
    if notes:
        lines += ["## Notes", ""] + [line for n in notes for line in (n, "")]
    return "\n".join(lines)


def _measured(m) -> str:
    """A goal's measured figure for the table: a number to two places; a pair (the chosen model's
    speedup, then the best sparsity answer's) as "a against b"; none as "-"."""
    if m is None:
        return "-"
    if isinstance(m, (list, tuple)):
        return " against ".join(f"{x:.2f}" for x in m)
    return f"{m:.2f}" if isinstance(m, float) else str(m)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default="../shared/data/cifar10-jpeg")
    p.add_argument("--weights", default=None, help="a dense.pt trained elsewhere (skips training)")
    p.add_argument("--folded", action="store_true", help="--weights stores classifier.0 folded (4096 x 512)")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's trainer.max_epochs")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--schedules", nargs="+", default=["oneshot"], choices=["oneshot", "iterative"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[128, 1])
    p.add_argument("--iters", type=int, default=20, help="timed forwards per model in the comparison")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--quick", action="store_true", help="generated class folders, ResNet-18, 2 epochs")
    p.add_argument("--label", default=None, help="a suffix for the result files' names (a variant of the run)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="more overrides of the searched runs (e.g. latency.auto_runtimes=[deploy,openvino])")
    p.add_argument("--iterative-set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides of the iterative run only (e.g. search.methods=[channel] prune.recover_epochs=0.5)")
    args = p.parse_args(argv)
    if args.quick:
        args.iters, args.batch_sizes = 2, [8, 1]
    if args.weights and not os.path.isfile(args.weights):
        p.error(f"--weights {args.weights} is not a file")
    res = measure(args)
    write_result(args.out, res["tag"], res, render)
    return res


if __name__ == "__main__":
    main()
