"""End to end: the smoke run, a sweep on learnable synthetic data, fixed ratios, reuse, resume."""

import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torchvision.models import resnet18, vgg16

from conftest import FAST_LEARNER, compose_cfg
from prunelab.callbacks import MagnitudePruning
from prunelab.data import SyntheticDataModule
from prunelab.io import load_state_dict
from prunelab.models import ImageClassifier
from prunelab.pipeline import run
from prunelab.pruning.masks import prunable_weights
from prunelab.report.schema import validate


def _zeros_fraction(state: dict, net: nn.Module) -> float:
    names = [f"{n}.weight" for n in prunable_weights(net)]
    zeros = sum(int((state[k] == 0).sum()) for k in names)
    return zeros / sum(state[k].numel() for k in names)


@pytest.mark.slow
def test_smoke_writes_every_output_and_vgg16_loads_strict(tmp_path):
    cfg = compose_cfg(tmp_path, ["+experiment=smoke"])
    report = run(cfg)
    out = Path(cfg.paths.output_dir)
    assert validate(json.loads((out / "report.json").read_text())) == []
    for name in ("report.md", "accuracy_vs_ratio.png", "latency.png", "layer_sparsity.png"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoints").exists()  # the fine-tune completed and is cached: no checkpoint kept
    for name in ("dense", "pruned"):
        net = vgg16(weights=None)
        net.classifier[6] = nn.Linear(4096, 10)
        state = torch.load(out / "models" / f"{name}.pt", weights_only=True)
        net.load_state_dict(state, strict=True)
    pruned_state = load_state_dict(out / "models" / "pruned.pt")
    assert _zeros_fraction(pruned_state, net) == pytest.approx(report["pruned"]["sparsity"], abs=1e-9)
    assert report["pruned"]["ratio"] in [c["ratio"] for c in report["search"]["curve"]]
    assert report["finetune"]["reused"] is False
    assert "pruned" in (out / "report.md").read_text()


def test_sweep_on_learnable_data_curve_falls_and_choice_passes(tmp_path):
    cfg = compose_cfg(tmp_path, FAST_LEARNER + ["search.grid=[0.5,0.8,0.95]",
                                                "search.refine_step=0.05", "search.tolerance=2.0"])
    report = run(cfg)
    s = report["search"]
    dense_acc = report["dense"]["val_acc"]["value"]
    assert dense_acc > 30.0  # far above the 10% of chance
    assert any(not c["passed"] for c in s["curve"])  # pruning far enough hurts
    best = s["best_ratio"]
    assert best > 0
    chosen = next(c for c in s["curve"] if c["ratio"] == best)
    assert chosen["passed"] and chosen["val_acc"] >= dense_acc - 2.0
    below = [c for c in s["curve"] if c["ratio"] <= best]
    assert all(c["passed"] for c in below)  # contiguous rule
    assert report["pruned"]["val_acc"]["value"] == pytest.approx(chosen["val_acc"])
    assert report["pruned"]["sparsity"] == pytest.approx(best, abs=0.01)
    assert report["timing_s"]["search"] > 0 and s["scope"] == "global"
    # unstructured zeros run the dense kernels: no speedup anywhere, the ratio kept only as noise
    assert "speedup" not in report["pruned"] and "speedup_p50" not in report["pruned"]
    lat = report["latency"]
    assert "speedup_p50" not in lat and len(lat["noise"]["paired_ratio_5_95"]) == 2
    assert set(lat["cv"]) == {"dense", "pruned"} and isinstance(lat["noisy"], bool)
    md = (Path(cfg.paths.output_dir) / "report.md").read_text()
    assert "speed" not in md.split("## ")[0].split("Latency:")[0] and "coefficient of variation" in md


def test_fixed_ratio_skips_search_and_reuses_the_finetune(tmp_path):
    overrides = FAST_LEARNER + ["prune.ratio=0.6", "prune.scope=layerwise", "stages.latency=false"]
    cfg1 = compose_cfg(tmp_path, overrides)
    first = run(cfg1)
    assert "search" not in first and first["pruned"]["ratio"] == 0.6
    assert first["finetune"]["reused"] is False
    cfg2 = compose_cfg(tmp_path, overrides[:-2] + ["prune.ratio=0.3", "stages.latency=false"])
    second = run(cfg2)
    assert second["finetune"]["reused"] is True
    # Stored once: both runs' models/dense.pt are the cached fine-tune's file (hard links), and the
    # fine-tune, completed and cached, left no ~1 GB checkpoint behind in the run that trained it.
    cached = Path(cfg1.finetune.cache_dir) / first["finetune"]["key"] / "dense.pt"
    for cfg, report in ((cfg1, first), (cfg2, second)):
        out = Path(cfg.paths.output_dir)
        assert os.path.samefile(out / "models" / "dense.pt", cached)
        assert report["files"]["dense_linked_to"] == str(cached)
        assert not list(out.rglob("*.ckpt"))
    assert second["dense"]["val_acc"] == first["dense"]["val_acc"]  # the very same weights
    assert second["pruned"]["sparsity"] == pytest.approx(0.3, abs=0.01)
    # A change to training settings is another fine-tune.
    third = run(compose_cfg(tmp_path, overrides[:-2] + ["trainer.max_epochs=1", "stages.prune=false",
                                                          "stages.latency=false"]))
    assert third["finetune"]["reused"] is False and "pruned" not in third


def test_resume_from_last_checkpoint(tmp_path):
    base = ["+experiment=smoke", "model=resnet18", "trainer.limit_train_batches=3", "stages.prune=false",
            "stages.latency=false", "finetune.cache=false"]
    cfg = compose_cfg(tmp_path, base + ["trainer.max_epochs=1"])
    run(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    first = torch.load(ckpt, weights_only=False, map_location="cpu")
    assert first["global_step"] == 3
    cfg2 = compose_cfg(tmp_path / "second", base + ["trainer.max_epochs=2", f"ckpt_path={ckpt}"])
    run(cfg2)
    resumed = torch.load(Path(cfg2.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert resumed["global_step"] == 6 and resumed["epoch"] == first["epoch"] + 1


def test_magnitude_pruning_callback_keeps_zeros_through_training(tmp_path):
    L.seed_everything(0)
    dm = SyntheticDataModule(train_size=160, test_size=16, batch_size=16, num_workers=0)
    module = ImageClassifier("resnet18", None, lr=0.05, weight_decay=5e-3)
    cb = MagnitudePruning(0.7, "global", when="fit_start")
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", callbacks=[cb], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=tmp_path, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    for name, w in prunable_weights(module.net).items():
        assert torch.all(w[~cb.masks[name]] == 0), name
    assert not any("weight_orig" in k or "weight_mask" in k for k in module.state_dict())
    frac = sum(int((w == 0).sum()) for w in prunable_weights(module.net).values())
    assert frac / sum(w.numel() for w in prunable_weights(module.net).values()) == pytest.approx(0.7, abs=1e-6)
    # and the net still loads into a plain torchvision resnet18
    net = resnet18(num_classes=10)
    net.load_state_dict(module.net.state_dict(), strict=True)


def test_multirun_ratio_grid_finetunes_once(run_cli, tmp_path):
    r = run_cli("+experiment=smoke", "model=resnet18", "prune.ratio=0.3,0.5,0.7", "stages.latency=false", options=("-m",))
    assert r.returncode == 0, r.stderr[-3000:]
    summaries = list((tmp_path / "logs").rglob("summary.json"))
    assert len(summaries) == 1
    jobs = json.loads(summaries[0].read_text())["jobs"]
    assert [j["ratio"] for j in jobs] == [0.3, 0.5, 0.7]
    assert [j["finetune_reused"] for j in jobs] == [False, True, True]
    assert len({j["finetune_source"] for j in jobs[1:]}) == 1
    assert (summaries[0].parent / "summary.md").is_file()


def test_readme_multirun_runs_from_any_folder_without_paths(tmp_path):
    """`python -m prunelab.train -m prune.ratio=...` as the README writes it (no paths.*), from a
    folder that is not the checkout: the sweep folder resolves before the jobs start."""
    import os
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "prunelab.train", "-m", "+experiment=smoke", "model=resnet18",
                        "trainer.limit_train_batches=1", "stages.latency=false", "prune.ratio=0.3,0.5"],
                       capture_output=True, text=True, timeout=900, cwd=tmp_path,
                       env=dict(os.environ, HYDRA_FULL_ERROR="0"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "HydraConfig was not set" not in r.stderr
    sweeps = list((tmp_path / "logs" / "smoke" / "multiruns").iterdir())
    assert len(sweeps) == 1 and (sweeps[0] / "summary.json").is_file()
    assert sorted(p.name for p in sweeps[0].iterdir() if p.is_dir() and p.name.isdigit()) == ["0", "1"]


def test_nothing_within_tolerance_keeps_dense_and_times_it_alone(tmp_path):
    """Every candidate fails (99% of the weights gone, no tolerance): the dense model stands. It is
    not timed against itself (two timings of one model differ only by noise), no speedup or
    unstructured-zeros note is reported, and the report says why the pruned column repeats dense."""
    cfg = compose_cfg(tmp_path, FAST_LEARNER + ["search.grid=[0.99]", "search.refine_step=null",
                                                "search.tolerance=0", "latency.iters=3", "latency.warmup=1"])
    report = run(cfg)
    p = report["pruned"]
    assert report["search"]["best_ratio"] == 0 and p["ratio"] == 0
    assert p["latency_ms"] is None and "speedup_p50" not in p
    assert report["dense"]["latency_ms"]["p50"] > 0 and report["dense"]["latency_ms"].get("interleaved_with") in (None, [])
    notes = " ".join(report["notes"])
    assert "the dense model stands" in notes and "at or above" not in notes and "Unstructured zeros" not in notes
    md = (Path(cfg.paths.output_dir) / "report.md").read_text()
    assert "method: none (nothing within the tolerance" in md and "the dense model timed alone" in md
    assert validate(json.loads((Path(cfg.paths.output_dir) / "report.json").read_text())) == []
