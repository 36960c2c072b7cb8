"""Fine-tuning at full CIFAR-10 scale: the notebook's loop, prunelab's defaults and ``+experiment=fast``.

Each procedure runs whole epochs, as a user's fine-tune does (every epoch's validation, prunelab's
checkpoint cadence and the notebook's final save included), in its own fresh process, on generated
data of CIFAR-10's size (``data=synthetic``: 40,000 training and 10,000 validation images, the
same uint8 arrays and transforms as the real set, which cannot be downloaded offline):

- ``notebook``: its cell (DataLoader with 2 workers, ``.item()`` per batch, validation every epoch);
- ``defaults``: ``prunelab.finetune`` with the config's defaults (callbacks included);
- ``fast``: the same with ``+experiment=fast`` resolved for this machine (on CUDA: compiled in
  reduce-overhead mode, each step's kernels replayed from CUDA graphs);
- ``fast-compile-default`` (with ``--procedures``): fast with ``model.compile_mode=default``, what
  the CUDA graphs buy. (Before 2026-11-28 fast compiled in the default mode, and the H200 run of that
  day named the reduce-overhead variant ``fast-graphs``.)

Reports per procedure the wall time of each epoch (prunelab's first from the fit's start, so its
sanity validation and compile count there; each procedure's final save in its last epoch),
images/s of the first epoch, of the steady state (the median of the epochs between the first and
the last: no compile, no final save; the last epoch alone when there are two) and of the whole fit.
On CUDA it judges the deployed-speed issue's goal: fast >= 10x the notebook loop's images/s.

    python -m benchmarks.finetune_scale --device cuda            # VGG16, 40k/10k, 3 epochs (make gpu-scale)
    python -m benchmarks.finetune_scale --train-size 1280 --epochs 2   # a CPU-sized run
    python -m benchmarks.finetune_scale --quick                  # ResNet-18, 320 images (the test)

Results: benchmarks/results/<date>-finetune-scale-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import DEFAULT_OUT, result_tag
from benchmarks.isolated import run_child
from prunelab import hardware
from prunelab.io import write_json, write_text
from prunelab.report.markdown import table

GOAL = 10.0  # fast / notebook images/s, steady state, at full scale on an H100
# fast right after the notebook: the goal's ratio survives a run stopped at its time limit
PROCEDURES = ("notebook", "fast", "defaults")
# each config a procedure runs (the notebook's data come from "defaults"): (+experiment=fast?, extra overrides)
VARIANTS = {"defaults": (False, ()), "fast": (True, ()),
            "fast-compile-default": (True, ("model.compile_mode=default",))}


def _cfg(spec: dict, procedure: str):
    from prunelab.compose import compose
    from prunelab.resolve import resolve_auto

    fast, extra = VARIANTS[procedure]
    overrides = ["data=synthetic", f"data.train_size={spec['train_size']}", "data.test_size=64",
                 # the real set's loader (CIFAR10DataModule's default); generated data defaults to 0
                 f"data.num_workers={spec['num_workers']}", f"model.arch={spec['arch']}", "model.weights=null",
                 f"trainer.max_epochs={spec['epochs']}", "trainer.enable_progress_bar=false",
                 f"trainer.accelerator={'gpu' if spec['device'].startswith('cuda') else 'cpu'}",
                 "finetune.cache=false", *(["+experiment=fast"] if fast else []), *extra]
    cfg = compose(overrides, Path(spec["work_dir"]) / procedure)
    resolve_auto(cfg)
    return cfg


def child_prunelab(spec: dict) -> dict:
    """prunelab's fine-tune stage as the pipeline runs it, with a clock at every epoch start."""
    from lightning import Callback

    from prunelab.finetune import finetune
    from prunelab.trainer import build, build_trainer

    device = torch.device(spec["device"])

    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    class EpochClock(Callback):
        def __init__(self):
            self.starts: list[float] = []
            self.end: float | None = None

        def on_fit_start(self, trainer, pl_module):  # before the sanity validation (where compile starts)
            self.starts.append(now())

        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch > 0:
                self.starts.append(now())

        def on_train_end(self, trainer, pl_module):  # after the last epoch's validation and checkpoint
            self.end = now()

    cfg = _cfg(spec, spec["procedure"])
    dm, module = build(cfg.data, "data"), build(cfg.model, "model")
    dm.setup("fit")
    clock = EpochClock()
    trainer = build_trainer(cfg, callbacks=[clock], enable_model_summary=False)
    t0 = time.perf_counter()
    finetune(cfg, trainer, module, dm)
    fit_s = time.perf_counter() - t0
    marks = [*clock.starts, clock.end]
    return {"epoch_s": [b - a for a, b in zip(marks, marks[1:], strict=False)], "fit_s": fit_s,
            "train_images": len(dm.train_set) * spec["epochs"],
            "settings": {"precision": str(cfg.trainer.precision), "channels_last": bool(cfg.model.channels_last),
                         "compile": bool(cfg.model.compile),
                         **({"compile_mode": cfg.model.compile_mode} if cfg.model.compile else {}),
                         "on_device": bool(cfg.data.on_device),
                         "checkpoint_min_interval_s": cfg.callbacks.get("model_checkpoint", {}).get("min_interval_s"),
                         "check_val_every_n_epoch": cfg.trainer.check_val_every_n_epoch}}


def child_notebook(spec: dict) -> dict:
    from benchmarks import notebook_procedure as nb
    from prunelab.trainer import build

    cfg = _cfg(spec, "defaults")
    dm = build(cfg.data, "data")
    dm.setup("fit")
    t0 = time.perf_counter()
    r = nb.train_epochs(spec["arch"], dm.train_set, dm.val_set, torch.device(spec["device"]), spec["epochs"],
                        num_workers=spec["num_workers"])
    return dict(r, fit_s=time.perf_counter() - t0, settings={"precision": "32-true", "num_workers": spec["num_workers"]})


def summarize(r: dict, per_epoch: int) -> dict:
    ips = [per_epoch / s for s in r["epoch_s"]]
    later = ips[1:-1] or ips[1:] or ips
    return {"first_epoch_images_per_s": ips[0], "steady_images_per_s": statistics.median(later),
            "fit_images_per_s": r["train_images"] / r["fit_s"], "epoch_s": r["epoch_s"], "fit_s": r["fit_s"]}


def measure(args, save=None) -> dict:
    """Each procedure in its own process; ``save(result_so_far)`` after each, so a run stopped at a
    time limit keeps what it measured. A procedure that fails is recorded with its error, not fatal."""
    cuda = args.device.startswith("cuda")
    res = {
        "what": "whole-epoch fine-tune speed at CIFAR-10 scale: notebook loop, prunelab defaults, +experiment=fast",
        "date": dt.date.today().isoformat(), "device": args.device,
        "hardware": hardware.detect(args.device).to_dict(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
        "procedures": {}, "errors": {}, "steady_vs_notebook": {},
    }
    with tempfile.TemporaryDirectory() as work:
        spec = {"work_dir": work, "train_size": args.train_size, "arch": args.arch, "epochs": args.epochs,
                "device": args.device, "num_workers": args.num_workers, "threads": torch.get_num_threads()}
        train_images = int(args.train_size * 0.8)  # data.val_fraction 0.2
        res["setup"] = {"arch": args.arch, "train_images": train_images, "val_images": args.train_size - train_images,
                        "epochs": args.epochs, "data": "synthetic (CIFAR-10-shaped uint8, same transforms)"}
        out = res["procedures"]
        for name in args.procedures:
            target = "benchmarks.finetune_scale:" + ("child_notebook" if name == "notebook" else "child_prunelab")
            try:
                raw = run_child(target, dict(spec, procedure=name))
            except RuntimeError as exc:  # recorded and reported; the other procedures still run
                res["errors"][name] = str(exc)[-2000:]
                print(f"{name}: FAILED\n{exc}", flush=True)
            else:
                out[name] = dict(summarize(raw, train_images), settings=raw["settings"])
                print(f"{name}: {out[name]['steady_images_per_s']:.0f} images/s steady, fit {raw['fit_s']:.1f} s",
                      flush=True)
            _judge(res, cuda)
            if save is not None:
                save(res)
    return res


def _judge(res: dict, cuda: bool) -> None:
    out = res["procedures"]
    res["loadavg_end"] = os.getloadavg()
    nb = out.get("notebook", {}).get("steady_images_per_s")
    res["steady_vs_notebook"] = {k: v["steady_images_per_s"] / nb for k, v in out.items() if k != "notebook" and nb}
    fast = res["steady_vs_notebook"].get("fast")
    res["goal"] = {"fast_vs_notebook_steady": fast, "target": GOAL, "applies": cuda,
                   "met": (fast >= GOAL) if cuda and fast is not None else None}


def render(res: dict) -> str:
    s, hw = res["setup"], res["hardware"]
    rows = [(k, f"{v['first_epoch_images_per_s']:.0f}", f"{v['steady_images_per_s']:.0f}",
             ("1.00x" if k == "notebook" else f"{res['steady_vs_notebook'][k]:.2f}x" if k in res["steady_vs_notebook"] else "-"), f"{v['fit_s']:.1f}",
             ", ".join(f"{a}={b}" for a, b in v["settings"].items()))
            for k, v in res["procedures"].items()]
    g = res["goal"]
    if g["fast_vs_notebook_steady"] is None:
        verdict, ratio = "not measured (a procedure is missing)", "-"
    else:
        verdict = ("met" if g["met"] else "NOT met") if g["applies"] else "judged on CUDA only"
        ratio = f"{g['fast_vs_notebook_steady']:.2f}x"
    errors = [f"- **{k} failed**: `{v.strip().splitlines()[-1] if v.strip() else v}`" for k, v in res["errors"].items()]
    return "\n".join([
        f"# Fine-tuning at scale ({res['date']})", "",
        f"Device: {hw.get('name')} ({res['device']}; CPU capability {res['cpu_capability']}), torch {res['torch']}, "
        f"{res['threads']} threads. {s['arch']}, {s['train_images']:,} training + {s['val_images']:,} validation "
        f"images ({s['data']}), {s['epochs']} epochs per procedure, each in a fresh process.", "",
        table(["procedure", "epoch 1 images/s", "later epochs images/s (median)", "vs notebook", "fit s", "settings"],
              rows), "",
        f"Goal (H100): fast >= {GOAL:.0f}x the notebook loop's images/s at full scale: "
        f"{ratio}, {verdict}.", "", *errors, *([""] if errors else [])])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", default="vgg16")
    p.add_argument("--train-size", type=int, default=50_000, help="images before the 80/20 train/val split")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--num-workers", type=int, default=2, help="loader workers (the notebook's and the real set's 2)")
    p.add_argument("--procedures", nargs="+", default=list(PROCEDURES), choices=("notebook", *VARIANTS),
                   help=f"which to run, in this order (default: {' '.join(PROCEDURES)})")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--quick", action="store_true", help="ResNet-18, 320 images, 2 epochs (a smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.arch, args.train_size, args.epochs = "resnet18", 320, 2
    # a run of other procedures than the default ones is saved beside the default run's result
    what = "finetune-scale" + ("" if args.procedures == list(PROCEDURES) else "-" + "-".join(args.procedures))
    tag = result_tag(what, args.device, args.quick)

    def save(res: dict) -> None:
        write_json(Path(args.out) / f"{tag}.json", res)
        write_text(Path(args.out) / f"{tag}.md", render(res))

    res = measure(args, save)
    print(render(res))
    return res


if __name__ == "__main__":
    main()
