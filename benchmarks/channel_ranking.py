"""How channel pruning's ranking choices keep a trained model's accuracy, one-shot, before recovery.

On a trained VGG16 (a ``dense.pt``; its classifier may be stored folded, ``--folded``), each of:

- ``global-mean``: one ranking across layers, each filter's L1 norm divided by its layer's mean
  (``prune.scope=global prune.normalize=mean``);
- ``global-none``: one ranking of raw L1 norms (``prune.normalize=none``);
- ``layerwise``: the same share of every conv, its own lowest L1 norms (``prune.scope=layerwise``);
- ``taylor``: one ranking across layers of first-order Taylor scores (``prune.importance=taylor
  prune.normalize=none``), the squared sum over a filter's weights and bias of weight x gradient of the
  cross-entropy, summed over the first ``--taylor-batches`` training batches, unaugmented: an
  estimate of what removing the filter costs the loss, comparable across layers;
- ``taylor-layerwise``: the same scores, the same share of every conv (``prune.scope=layerwise``);
- ``taylor-macs``: each Taylor score divided by the multiply-adds its channel costs
  (``prune.normalize=macs``), across layers: importance per unit of compute removed;

prunes the model at each ``--ratios`` (widths rounded to ``prune.round_to``, 16) and counts its
top-1 on the first ``--val-images`` validation images, bf16 autocast where the CPU has native bf16.

    python -m benchmarks.channel_ranking --weights DENSE_PT --data-root ../shared/data/cifar10-jpeg

Results: benchmarks/results/<date>-channel-ranking-cpu.{json,md}, with the CPU's flags.
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from benchmarks.common import DEFAULT_OUT, result_tag, write_result
from prunelab import hardware
from prunelab.data import ImageFolderDataModule
from prunelab.evaluation import count_correct
from prunelab.io import load_state_dict
from prunelab.models.factory import build_from_state_dict, unfold_classifier
from prunelab.pruning.channel import (
    ChannelRanking,
    conv_channels,
    count_macs,
    default_example,
    prune_channels,
    rank_channels,
)
from prunelab.pruning.taylor import Calibration
from prunelab.report.markdown import table

RANKINGS = ("global-mean", "global-none", "layerwise", "taylor", "taylor-layerwise", "taylor-macs")


def plans(net: nn.Module, ratio: float, round_to: int, taylor: ChannelRanking,
          taylor_macs: ChannelRanking) -> dict[str, dict]:
    """Each ranking's plan at ``ratio``; ``taylor`` and ``taylor_macs`` are prunelab's Taylor
    rankings of ``net`` (``rank_channels(net, "taylor", normalize="none" or "macs", calibration=...)``),
    ranked once."""
    mean = rank_channels(net, normalize="mean")
    return {
        "global-mean": mean.plan(ratio, 1, round_to),
        "global-none": rank_channels(net, normalize="none").plan(ratio, 1, round_to),
        "layerwise": mean.plan(ratio, 1, round_to, layerwise=True),
        "taylor": taylor.plan(ratio, 1, round_to),
        "taylor-layerwise": taylor.plan(ratio, 1, round_to, layerwise=True),
        "taylor-macs": taylor_macs.plan(ratio, 1, round_to),
    }


def measure(args) -> dict:
    hw = hardware.detect("cpu")
    precision = "bf16-mixed" if hw.native_bf16 else "32-true"
    state = load_state_dict(args.weights)
    if args.folded:
        state = unfold_classifier(state, 512)
    dense = build_from_state_dict("vgg16", state)
    dm = ImageFolderDataModule(root=args.data_root, cache_dir=args.cache_dir, num_workers=0, batch_size=128, seed=0)
    dm.prepare_data()
    dm.setup("fit")
    val = Subset(dm.val_set, range(min(args.val_images, len(dm.val_set))))
    loader = DataLoader(val, batch_size=256)

    def accuracy(net: nn.Module) -> float:
        c = count_correct(net.eval(), loader, len(val), device=torch.device("cpu"), precision=precision)
        return 100 * c.correct / c.seen

    t0 = time.perf_counter()
    calibration = Calibration.from_datamodule(dm, args.taylor_batches, 128)
    taylor = rank_channels(dense, "taylor", normalize="none", calibration=calibration)
    taylor_macs = rank_channels(dense, "taylor", normalize="macs", calibration=calibration)
    taylor_s = time.perf_counter() - t0
    example = default_example(dense)
    dense_macs = count_macs(dense, example)
    rows = []
    for ratio in args.ratios:
        for name, plan in plans(dense, ratio, args.round_to, taylor, taylor_macs).items():
            net = prune_channels(dense, plan, example)
            rows.append({"ratio": ratio, "ranking": name, "val_acc": accuracy(net),
                         "macs_share": count_macs(net, example) / dense_macs,
                         "widths": list(conv_channels(net).values())})
            del net
    return {
        "what": "one-shot accuracy of channel pruning's rankings on a trained model, before any recovery",
        "date": dt.date.today().isoformat(), "weights": str(args.weights), "val_images": len(val),
        "precision": precision, "round_to": args.round_to, "taylor_batches": args.taylor_batches,
        "taylor_s": taylor_s, "dense_val_acc": accuracy(dense),
        "machine": {**hw.to_dict(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__},
        "rows": rows,
    }


def render(res: dict) -> str:
    m = res["machine"]
    rows = [(f"{r['ratio']:.2f}", r["ranking"], f"{r['val_acc']:.2f}",
             f"{r['macs_share']:.2f}" if "macs_share" in r else "-", " ".join(map(str, r["widths"])))
            for r in res["rows"]]
    return "\n".join([
        f"# Channel pruning's rankings, one-shot ({res['date']})", "",
        f"Machine: {m.get('name')} ({m['cpu_capability']}, flags {', '.join(m.get('cpu_flags') or [])}, native bf16: "
        f"{m.get('native_bf16')}), torch {m['torch']}, {m['threads']} threads; {res['precision']}.",
        f"Model: `{res['weights']}`; dense {res['dense_val_acc']:.2f}% on the first {res['val_images']} validation "
        f"images. Widths rounded to multiples of {res['round_to']}; no recovery. Taylor scores from "
        f"{res['taylor_batches']} training batches of 128 in {res['taylor_s']:.1f} s.", "",
        table(["ratio", "ranking", "val acc %", "MACs / dense", "conv widths"], rows), "",
        "`taylor` is `prune.importance=taylor prune.normalize=none` across layers; `taylor-layerwise` the same "
        "scores with `prune.scope=layerwise`; `taylor-macs` each score per multiply-add its channel costs "
        "(`prune.normalize=macs`). MACs / dense: multiply-adds per image against the dense model's, in torchvision's layout (pool unfolded).", "",
    ])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True, help="a trained VGG16's dense.pt")
    p.add_argument("--folded", action="store_true", help="--weights stores classifier.0 folded (4096 x 512)")
    p.add_argument("--data-root", default="../shared/data/cifar10-jpeg")
    p.add_argument("--cache-dir", default=str(Path(__file__).parent / ".cache" / "imagefolder"))
    p.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    p.add_argument("--round-to", type=int, default=16)
    p.add_argument("--val-images", type=int, default=5000)
    p.add_argument("--taylor-batches", type=int, default=8)
    p.add_argument("--label", default="", help="appended to the result's name, to tell models apart")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    if not Path(args.weights).is_file():
        p.error(f"--weights {args.weights}: no such file (a run's models/dense.pt)")
    if any(not 0 < r < 1 for r in args.ratios):
        p.error(f"--ratios must lie in (0, 1), got {args.ratios}")
    res = measure(args)
    tag = result_tag("channel-ranking", "cpu") + (f"-{args.label}" if args.label else "")
    write_result(args.out, tag, res, render)
    return res


if __name__ == "__main__":
    main()
