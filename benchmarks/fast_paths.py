"""Does ``+experiment=fast`` fine-tune at least as fast as the defaults on this machine?

Runs prunelab's own fine-tune (Lightning Trainer + ImageClassifier + the data module, exactly as
``benchmarks.compare`` times it) for the defaults and for ``+experiment=fast`` with its ``auto``
settings resolved from this machine, taking turns (default, fast, default, fast, ...) in one
process so a drift in machine load hits both alike. Reports images/s per turn, the median ratio,
what fast resolved to and why, and the CPU's capability and flags.

    python -m benchmarks.fast_paths [--turns 3] [--batches 6] [--quick]

Results: benchmarks/results/<date>-fast-vs-default-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks.common import DEFAULT_OUT, DEFAULT_ROOT, REPO
from benchmarks.procedures import child_prunelab_finetune, fast_resolution
from prunelab import hardware
from prunelab.io import write_json, write_text
from prunelab.report.markdown import table


def measure(args: argparse.Namespace) -> dict:
    root = (REPO / args.data_root).resolve()
    real = (root / "cifar-10-batches-py").is_dir() and not args.quick
    with tempfile.TemporaryDirectory() as work:
        spec = {"work_dir": work, "data": "cifar10" if real else "synthetic", "data_root": str(root),
                "train_size": 1280, "test_size": 64, "arch": "resnet18" if args.quick else args.arch,
                "device": args.device, "weights": None, "ft_warmup": 1 if args.quick else args.warmup,
                "ft_batches": 2 if args.quick else args.batches, "threads": torch.get_num_threads()}
        resolved = fast_resolution(spec)
        turns: dict[str, list[dict]] = {"default": [], "fast": []}
        for turn in range(args.turns):
            for name in ("default", "fast"):
                r = child_prunelab_finetune(dict(spec, fast=name == "fast"))
                turns[name].append(r)
                print(f"turn {turn + 1} {name}: {r['images_per_s']:.1f} images/s "
                      f"({r['precision']}, channels_last={r['channels_last']}, on_device={r['on_device']})", flush=True)
    ratios = [f["images_per_s"] / d["images_per_s"] for d, f in zip(turns["default"], turns["fast"], strict=True)]
    return {
        "what": "fine-tune images/s, prunelab defaults vs +experiment=fast (auto resolved), in turns",
        "date": dt.date.today().isoformat(),
        "hardware": hardware.detect(args.device).to_dict(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
        "loadavg_end": os.getloadavg(),
        "setup": {k: spec[k] for k in ("data", "arch", "device", "ft_warmup", "ft_batches")},
        "fast_resolves_to": {k: v for k, v in resolved.items() if k != "hardware"},
        "turns": turns,
        "fast_over_default": ratios,
        "fast_over_default_median": statistics.median(ratios),
        "goal": "fast >= defaults (ratio >= 1 within this machine's run-to-run noise)",
    }


def render(res: dict) -> str:
    rows = [(i + 1, f"{d['images_per_s']:.1f}", f"{f['images_per_s']:.1f}", f"{r:.2f}")
            for i, (d, f, r) in enumerate(zip(res["turns"]["default"], res["turns"]["fast"], res["fast_over_default"],
                                              strict=True))]
    hw = res["hardware"]
    lines = [f"# +experiment=fast vs defaults, fine-tune images/s ({res['date']})", "",
             f"Machine: {hw.get('name')} ({res['cpu_capability']}, native bf16: {hw.get('native_bf16')}), "
             f"torch {res['torch']}, {res['threads']} threads; {res['setup']['arch']} on {res['setup']['data']} data, "
             f"{res['setup']['ft_batches']} timed batches of 128 after {res['setup']['ft_warmup']} warm-up.", "",
             "fast resolved to: " + "; ".join(f"`{k}={v['value']}` ({v['reason']})"
                                              for k, v in res["fast_resolves_to"].items()), "",
             table(["turn", "defaults images/s", "fast images/s", "fast / defaults"], rows), "",
             f"Median fast / defaults: **{res['fast_over_default_median']:.2f}x**.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=DEFAULT_ROOT)
    p.add_argument("--arch", default="vgg16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--quick", action="store_true", help="resnet18, synthetic data, 1 turn of 2 batches (a smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.turns = 1
    res = measure(args)
    tag = f"{res['date']}-fast-vs-default-{args.device}{'-quick' if args.quick else ''}"
    out = Path(args.out)
    write_json(out / f"{tag}.json", res)
    write_text(out / f"{tag}.md", render(res))
    print(render(res))
    return res


if __name__ == "__main__":
    main()
