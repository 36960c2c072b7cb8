"""What prunelab's training loop costs per step beyond the arithmetic: its Lightning step against a
plain PyTorch loop, on the same on-device batches and the same tiny network.

A network this small (one strided conv and a Linear) does almost no arithmetic, so each step's
time is the loop's own work: the batch (made on the device), the Lightning machinery, logging,
metrics and the fused SGD step. On a GPU that per-step work is what a fast fine-tune is bound by
once the arithmetic is quick (an H200 ran VGG16's fast fine-tune at ~17 ms a step against a
0.62 ms bf16 forward, 2026-11-27). The two loops take turns (plain, prunelab, prunelab, plain, ...)
in one process; each prunelab turn is one epoch of a fresh Trainer built from the config's
defaults (checkpoint callback, CSV logger and the per-batch seeding every prunelab fine-tune has;
no validation), timed from its epoch's start to its end.

    python -m benchmarks.step_overhead [--device cuda] [--turns 3] [--steps 200]
    python -m benchmarks.step_overhead --quick      # its test: 1 turn of 10 steps

Results: benchmarks/results/<date>-step-overhead-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import DEFAULT_OUT, result_tag, write_result
from prunelab import hardware
from prunelab.report.markdown import table


def tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_net(arch: str) -> nn.Module:
    """``tiny`` (almost no arithmetic: the loop's own cost shows) or a torchvision model, 10 classes."""
    if arch == "tiny":
        return tiny_net()
    from prunelab.models.factory import build_classifier

    return build_classifier(arch, None, 10)


def plain_turn(loader, device: torch.device, arch: str = "tiny", precision: str = "32-true") -> float:
    """Seconds per step of the loop a user would write: forward, loss, zero_grad, backward, step
    (under the same autocast as the Trainer's ``precision``)."""
    from prunelab.evaluation import autocast_for
    from prunelab.models.classifier import make_sgd

    torch.manual_seed(0)
    net = make_net(arch).to(device)
    opt = make_sgd(list(net.parameters()), 0.01, 0.9, 5e-4)
    criterion = nn.CrossEntropyLoss()
    _sync(device)
    t0, steps = time.perf_counter(), 0
    for x, y in loader:
        with autocast_for(device, precision):
            loss = criterion(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
    _sync(device)
    return (time.perf_counter() - t0) / steps


def prunelab_turn(loader, device: torch.device, work: Path, arch: str = "tiny", precision: str = "32-true") -> float:
    """Seconds per step of one epoch of prunelab's Trainer (config defaults) on the same batches."""
    from lightning import Callback

    from prunelab.callbacks.checkpoint import ResumeState
    from prunelab.compose import compose
    from prunelab.models.classifier import ImageClassifier
    from prunelab.trainer import build_trainer

    class EpochClock(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            _sync(device)
            self.t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            _sync(device)
            self.seconds = time.perf_counter() - self.t0

    cfg = compose(["trainer.enable_progress_bar=false", f"trainer.precision={precision}"], work)
    torch.manual_seed(0)
    module = ImageClassifier(net=make_net(arch), num_classes=10)
    clock = EpochClock()
    # ResumeState as prunelab.finetune adds it to every fine-tune (per-batch seeds, checkpoint stamps)
    trainer = build_trainer(cfg, callbacks=[ResumeState(0, "bench", "bench"), clock], enable_model_summary=False,
                            max_epochs=1, limit_val_batches=0,
                            num_sanity_val_steps=0, accelerator="gpu" if device.type == "cuda" else "cpu")
    trainer.fit(module, train_dataloaders=loader)
    return clock.seconds / len(loader)


def measure(args) -> dict:
    from prunelab.data.on_device import DeviceLoader

    device = torch.device(args.device)
    hw = hardware.detect(device)
    n = args.steps * args.batch_size
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g).to(device)
    labels = torch.randint(0, 10, (n,), generator=g).to(device)
    loader = DeviceLoader(images, labels, batch_size=args.batch_size, shuffle=True, augment=True)
    plain, ours = [], []
    with tempfile.TemporaryDirectory() as tmp:
        plain_turn(loader, device, args.arch, args.precision)  # warm-up: first allocations, library plans
        for turn in range(args.turns):
            order = ("plain", "prunelab") if turn % 2 == 0 else ("prunelab", "plain")
            for which in order:
                if which == "plain":
                    plain.append(plain_turn(loader, device, args.arch, args.precision) * 1e3)
                else:
                    ours.append(prunelab_turn(loader, device, Path(tmp) / f"turn{turn}", args.arch,
                                              args.precision) * 1e3)
    p, o = statistics.median(plain), statistics.median(ours)
    return {
        "what": f"ms per training step, {args.arch} on on-device batches: prunelab's Lightning step vs a plain loop",
        "date": dt.date.today().isoformat(), "device": str(device), "hardware": hw.to_dict(),
        "hardware_summary": hw.describe(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
        "setup": {"steps": args.steps, "batch_size": args.batch_size, "turns": args.turns, "arch": args.arch,
                  "precision": args.precision},
        "plain_ms": plain, "prunelab_ms": ours, "plain_ms_median": p, "prunelab_ms_median": o,
        "overhead_ms": o - p, "ratio": o / p,
    }


def render(res: dict) -> str:
    s = res["setup"]
    rows = [(str(i + 1), f"{a:.2f}", f"{b:.2f}", f"{b / a:.2f}x") for i, (a, b) in
            enumerate(zip(res["plain_ms"], res["prunelab_ms"], strict=True))]
    return "\n".join([
        f"# Per-step overhead of prunelab's training loop ({res['date']})", "",
        f"Device: {res['hardware'].get('name')} ({res['hardware_summary']}), torch {res['torch']}, "
        f"{res['threads']} threads. "
        + ("Tiny network (one strided conv, one Linear)" if s.get("arch", "tiny") == "tiny" else f"{s['arch']} (10 classes)")
        + f", precision {s.get('precision', '32-true')}, eager, {s['steps']} on-device batches "
        f"of {s['batch_size']} per turn, {s['turns']} turns in one process.", "",
        table(["turn", "plain loop ms/step", "prunelab ms/step", "prunelab / plain"], rows), "",
        f"Median: plain {res['plain_ms_median']:.2f} ms, prunelab {res['prunelab_ms_median']:.2f} ms: "
        f"**{res['overhead_ms']:.2f} ms** of framework work per step ({res['ratio']:.2f}x).", ""])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--arch", default="tiny", help="tiny (the loop's own cost) or a torchvision model, e.g. vgg16")
    # no 16-mixed: the Trainer would add a GradScaler the plain loop lacks, and the comparison would not be like for like
    p.add_argument("--precision", default="32-true", choices=("32-true", "bf16-mixed"),
                   help="the Trainer's precision; the plain loop autocasts alike")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--quick", action="store_true", help="1 turn of 10 steps (a smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.turns, args.steps = 1, 10
    if args.turns < 1 or args.steps < 1 or args.batch_size < 1:
        p.error("--turns, --steps and --batch-size must be >= 1")
    res = measure(args)
    what = "step-overhead" if args.arch == "tiny" else f"step-overhead-{args.arch}-{args.precision}"
    tag = result_tag(what, args.device, args.quick)
    write_result(args.out, tag, res, render)
    return res


if __name__ == "__main__":
    main()
