"""The fastest model within tolerance, measured: does ``search.objective=latency`` beat the dense
model as the notebook runs it, and every single method's sparsity answer, on this machine?

1. VGG16 fine-tuned on the shared CIFAR-10 subset as ``benchmarks.compare`` trains it (random init:
   ImageNet weights cannot be downloaded here; ``+experiment=fast`` resolved for this machine),
   cached under ``benchmarks/.cache``.
2. prunelab's pipeline with ``search.objective=latency`` across magnitude, channel, 2:4 and
   channel+2:4 (deploy runtime, batch 128), and, for the cost goal, today's magnitude sparsity search
   on the same weights; wall time of both searches.
3. In one process, every model taking turns each iteration: the dense model as the notebook runs it
   (eager fp32, NCHW), the dense deploy form, the latency search's answer and each method's own
   sparsity answer (its highest ratio within the tolerance) in the deploy form. Deploy forms follow
   the product's ``auto`` rules. The float32 CPU results of 2026-11-27 and 2026-11-28 ran prunelab's
   own convolution and Linear kernels, since removed, so they are not comparable with later ones.

    python -m benchmarks.fastest [--epochs 5] [--iters 10] [--quick]

Results: benchmarks/results/<date>-fastest-<device>.{json,md}, with the CPU's capability.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import DEFAULT_OUT, DEFAULT_ROOT, REPO, result_tag
from benchmarks.procedures import child_train
from prunelab import hardware
from prunelab.compose import compose
from prunelab.deploy import registry
from prunelab.deploy.eager import eager_form
from prunelab.deploy.native import deploy_form
from prunelab.deploy.spec import resolve_spec
from prunelab.io import load_state_dict, write_json, write_text
from prunelab.latency import paired_stats, sample_batch, time_interleaved
from prunelab.models.factory import build_from_state_dict
from prunelab.pipeline import run
from prunelab.pruning.registry import make_pruner
from prunelab.report.markdown import table
from prunelab.resolve import resolve_auto

CACHE = REPO / "benchmarks" / ".cache"


def _pipeline(overrides: list[str], work: Path) -> tuple[dict, float]:
    cfg = compose(overrides, work)
    t0 = time.perf_counter()
    report = run(cfg)
    return report, time.perf_counter() - t0


def measure(args) -> dict:
    root = (REPO / args.data_root).resolve()
    real = (root / "cifar-10-batches-py").is_dir() and not args.quick
    arch = "vgg16"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        spec = {"work_dir": str(work), "data": "cifar10" if real else "synthetic", "data_root": str(root),
                "train_size": 640, "test_size": 128, "arch": arch, "device": args.device,
                "epochs": 1 if args.quick else args.epochs, "cache_dir": str(CACHE / "finetune"),
                "train_overrides": ["+experiment=fast"] + (["trainer.limit_train_batches=2"] if args.quick else [])
                # fast compiles on CUDA: for a few short epochs the compile would outlast the training
                + (["model.compile=false"] if args.device.startswith("cuda") else []),
                "threads": torch.get_num_threads()}
        trained = child_train(spec)
        data = ([f"data.root={root}", "data.download=false"] if real else
                # generated data prove the path runs; a model barely above chance on them is searched anyway
                ["data=synthetic", "data.train_size=640", "data.test_size=128", "search.allow_weak_model=true"])
        base = [*data, f"model.arch={arch}", "model.weights=null", f"finetune.weights_path={trained['weights']}",
                f"trainer.accelerator={'gpu' if args.device.startswith('cuda') else 'cpu'}", "callbacks=none", "logger=none", "latency.batch_size=128",
                "latency.batch_sizes=[128]", f"latency.iters={args.search_iters}", "latency.warmup=2"]
        if args.quick:
            base += ["search.grid=[0.3,0.6]", "search.refine_step=null"]
        fastest, fastest_s = _pipeline([*base, "search.objective=latency"], work / "latency")
        # Kept as soon as it exists: a time-limited run (make gpu-check) that ends before the final
        # comparison still leaves the search's candidates, front and answer.
        write_json(Path(args.out) / f"{_tag(args)}-search-partial.json",
                   {"date": dt.date.today().isoformat(), "device": args.device, "weights": trained,
                    "search": fastest["search"], "latency": fastest.get("latency"), "wall_s": fastest_s})
        sparsity, sparsity_s = _pipeline([*base, "search.objective=sparsity", "prune.method=magnitude",
                                          "stages.latency=false"], work / "magnitude")
        search = fastest["search"]
        dense_sd = load_state_dict(trained["weights"])
    device = torch.device(args.device)
    timed = time_answers(dense_sd, search, device, args.iters, rebuild_options(fastest), arch=arch)
    resolved, hw, dtype, layout = timed["resolved"], timed["hw"], timed["dtype"], timed["layout"]
    answers, samples, vs_notebook, speedups = (timed[k] for k in ("answers", "samples", "vs_notebook", "speedups"))
    chosen = search.get("chosen")
    latency_x = speedups.get("latency_search_deploy")
    beats = beats_sparsity(answers, speedups, samples)
    return {
        "what": "latency-objective search vs the notebook's dense model and each method's sparsity answer",
        "date": dt.date.today().isoformat(), "hardware": hw.to_dict(), "device": str(device),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "deploy": {"dtype": str(dtype), "channels_last": layout,
                                                        "resolved": {k: v for k, v in resolved.items() if k != "hardware"}},
        "weights": trained, "data": spec["data"], "dense_val_acc": search["dense_val_acc"],
        "tolerance": search["tolerance"], "chosen": chosen, "final_round": search.get("final_round"), "answers": {k: list(v) for k, v in answers.items()},
        "candidates": search["candidates"], "pareto": search["pareto"],
        "latency_ms_p50": {t: float(torch.tensor(s).median()) for t, s in samples.items()},
        "speedup_vs_notebook_dense": speedups,
        "speedup_vs_notebook_paired_5_95": {t: [r["paired_ratio"]["p5"], r["paired_ratio"]["p95"]]
                                            for t, r in vs_notebook.items()},
        "search_wall_s": {"latency_objective": fastest_s, "magnitude_sparsity": sparsity_s,
                          "latency_search_stage": fastest["timing_s"]["search"],
                          "magnitude_search_stage": sparsity["timing_s"]["search"]},
        "goals": {
            "latency answer >= 4x the notebook's dense": {"measured": latency_x, "met": bool(latency_x and latency_x >= 4)},
            "latency answer faster than the best sparsity answer": beats,
            "latency search <= 3x the magnitude search's wall time": {
                "measured": fastest["timing_s"]["search"] / sparsity["timing_s"]["search"],
                "met": fastest["timing_s"]["search"] <= 3 * sparsity["timing_s"]["search"]},
        },
    }


def rebuild_options(report: dict) -> dict:
    """The pruner options a run searched with (scope, importance, linears, round_to, ...), from its
    report: an answer rebuilt from the dense weights is the model the search judged only when it is
    cut by the same rule (a default, global ranking cuts other channels at the same ratio)."""
    from omegaconf import OmegaConf

    from prunelab.pruning.spec import prune_spec

    options = prune_spec(OmegaConf.create(report["config"])).pruner_options()
    if options.get("importance") == "taylor":
        raise ValueError("this benchmark rebuilds answers from the dense weights, and a taylor ranking needs the "
                         "run's calibration images: search with prune.importance=l1 or l2")
    return options


def rebuild(dense: torch.nn.Module, method: str, ratio: float, options: dict) -> torch.nn.Module:
    """``dense`` (copied) cut at ``ratio`` by ``method`` under the run's ``options`` (``rebuild_options``)."""
    return make_pruner(method, copy.deepcopy(dense), **options).finish(ratio).eval()


def time_answers(dense_sd: dict, search: dict, device: torch.device, iters: int, options: dict,
                 arch: str = "vgg16", batch_size: int = 128, runtime: str = "deploy", built: dict | None = None) -> dict:
    """In one process, every model taking turns each iteration at ``batch_size``: the dense model as the
    notebook runs it (eager fp32, NCHW), the dense model, the latency search's answer and each
    method's own sparsity answer (its highest ratio within the tolerance; both rebuilt from the dense
    weights under the run's ``options``, ``rebuild_options``) served in ``runtime`` (the
    one the search timed them in: prunelab's deploy form by default), as the product's ``auto``
    rules resolve it on this machine. The ``*_deploy`` names mean "as served". ``built`` adds answers
    that cannot be rebuilt from a ranking ({tag: (network, method, ratio)}: an iterative search's
    recovered model), timed in the same turns."""
    dense = build_from_state_dict(arch, dense_sd).eval().to(device)
    models = {"dense_eager_fp32_nchw": eager_form(dense, None, channels_last=False)}
    cfg = compose([f"model.arch={arch}", "+experiment=fast", f"latency.runtime={runtime}",
                   f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}"], CACHE / "compose")
    resolved = resolve_auto(cfg)
    hw = hardware.detect(device.type)
    dtype = hardware.resolve_dtype("auto", hw).value
    layout = bool(cfg.latency.channels_last)  # the deploy layout, resolved as the pipeline resolves it
    batch = sample_batch(torch.utils.data.TensorDataset(torch.randn(batch_size, 3, 32, 32), torch.zeros(batch_size)),
                         batch_size)
    spec = resolve_spec(cfg.latency, hw)[0]
    served = registry.require(runtime, hw)

    def deploy(net, method: str | None = None):
        # A 2:4 answer runs its 2:4 layers on the sparse kernels, as the search timed it (CUDA sm80+).
        two_four = method is not None and "semi_structured" in method.split("+")
        if runtime == "deploy":
            return deploy_form(net.to(device), dtype=dtype, channels_last=layout, device=device, example_batch=batch,
                               two_four=two_four)
        return served.build(net.to(device), spec, device=device, example_batch=batch, two_four=two_four)

    models["dense_deploy"] = deploy(dense)
    answers = {}
    chosen = search.get("chosen")
    if chosen:
        answers["latency_search"] = (chosen["method"], chosen["ratio"])
    for method, ratio in search["best_ratio_by_method"].items():
        if ratio > 0:
            answers[f"sparsity_{method}"] = (method, ratio)
    for tag, (method, ratio) in answers.items():
        models[f"{tag}_deploy"] = deploy(rebuild(dense, method, ratio, options), method)
    for tag, (net, method, ratio) in (built or {}).items():
        answers[tag] = (method, ratio)
        models[f"{tag}_deploy"] = deploy(net.eval(), method)
    x = models["dense_deploy"].prepare(batch)
    samples = time_interleaved(models, x, device, warmup=2 if device.type == "cpu" else 10, iters=iters)
    base_tag = "dense_eager_fp32_nchw"
    vs_notebook = {t: paired_stats(samples[base_tag], samples[t], batch_size) for t in models if t != base_tag}
    return {"resolved": resolved, "hw": hw, "dtype": dtype, "layout": layout, "answers": answers, "runtime": runtime,
            "samples": samples, "vs_notebook": vs_notebook,
            "speedups": {t: r["speedup_p50"] for t, r in vs_notebook.items()}}


def beats_sparsity(answers: dict, speedups: dict, samples: dict | None = None) -> dict:
    """The goal "the latency answer is faster than the best single-method sparsity answer", judged
    honestly: the same model is equal, not faster; different models must differ beyond the noise of
    their own paired timing (the slow end, 5th percentile, of the per-iteration ratios above 1)."""
    lat = answers.get("latency_search")
    sparse = {k: tuple(v) for k, v in answers.items() if k.startswith("sparsity_")}
    if lat is None:
        return {"measured": None, "met": False, "why": "the latency search kept the dense model"}
    if not sparse:
        return {"measured": speedups.get("latency_search_deploy"), "met": True,
                "why": "no method had a sparsity answer above 0"}
    best = max(sparse, key=lambda k: speedups[f"{k}_deploy"])
    measured = [speedups["latency_search_deploy"], speedups[f"{best}_deploy"]]
    if tuple(lat) == sparse[best]:
        return {"measured": measured, "met": False,
                "why": f"the same model ({lat[0]} {lat[1]}) as the {best} answer: equal, not faster "
                       "(the two figures are one model timed twice)"}
    if samples is None:
        return {"measured": measured, "met": False, "why": "no paired samples to judge the noise"}
    pr = paired_stats(samples[f"{best}_deploy"], samples["latency_search_deploy"], 128)["paired_ratio"]
    return {"measured": measured, "met": pr["p5"] > 1.0, "paired_5_95": [pr["p5"], pr["p95"]],
            "why": f"{lat[0]} {lat[1]} against the {best} answer {sparse[best][0]} {sparse[best][1]}, in turns"}


def render(res: dict) -> str:
    hw = res["hardware"]
    rows = [(t, f"{res['latency_ms_p50'][t]:.1f}", f"{res['speedup_vs_notebook_dense'].get(t, 1.0):.2f}x",
             " / ".join(str(v) for v in res["answers"].get(t.removesuffix("_deploy"), [])) or "-")
            for t in res["latency_ms_p50"]]
    def shown(v):
        m = v["measured"]
        m = f"{m:.2f}" if isinstance(m, float) else " vs ".join(f"{x:.2f}" for x in m) if isinstance(m, list) else m
        return f"{m} ({v['why']})" if v.get("why") else m

    goals = [(k, shown(v), "met" if v["met"] else "NOT met") for k, v in res["goals"].items()]
    return "\n".join([
        f"# The fastest model within tolerance ({res['date']})", "",
        f"Machine: {hw.get('name')} ({res['cpu_capability']}, native bf16: {hw.get('native_bf16')}), torch "
        f"{res['torch']}, {res['threads']} threads. VGG16 fine-tuned on {res['data']} data (random init), dense val "
        f"{res['dense_val_acc']:.2f}%, tolerance {res['tolerance']} points. Deploy form: {res['deploy']['dtype']}, "
        f"channels_last={res['deploy']['channels_last']}, pool folded. Batch 128, all models in turns.", "",
        table(["model", "p50 ms", "vs notebook dense", "method / ratio"], rows), "",
        table(["goal", "measured", ""], goals), "",
        f"Search wall time: latency objective {res['search_wall_s']['latency_search_stage']:.0f} s, magnitude "
        f"sparsity {res['search_wall_s']['magnitude_search_stage']:.0f} s.", "", *_final(res.get("final_round"))])


def _final(f: dict | None) -> list[str]:
    if not f:
        return ["No final round (fewer than two candidates faster than dense).", ""]
    rows = [(c["method"], f"{c['ratio']:.2f}", f"{c['p50_ms']:.1f}", f"{c['speedup']:.2f}x",
             "yes" if c["speedup_beyond_noise"] else "no") for c in f["shortlist"]]
    return [f"Final round of the search (shortlist timed together with dense, p50 {f['dense_p50_ms']:.1f} ms): "
            f"before {f['before']}, chosen {f['chosen']}, changed: {f['changed_choice']}.", "",
            table(["method", "ratio", "p50 ms", "vs dense deploy", "beyond noise"], rows), ""]


def _tag(args) -> str:
    return result_tag("fastest", args.device, args.quick)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=DEFAULT_ROOT)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--iters", type=int, default=10, help="timed forwards per model in the final comparison")
    p.add_argument("--search-iters", type=int, default=5, help="timed forwards per candidate in the search")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--quick", action="store_true", help="synthetic data, 1 short epoch, 2 ratios (a smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.iters, args.search_iters = 2, 2
    res = measure(args)
    tag = _tag(args)
    write_json(Path(args.out) / f"{tag}.json", res)
    (Path(args.out) / f"{tag}-search-partial.json").unlink(missing_ok=True)  # the whole result supersedes it
    write_text(Path(args.out) / f"{tag}.md", render(res))
    print(render(res))
    return res


if __name__ == "__main__":
    main()
