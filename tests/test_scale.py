"""Scale-out through existing engines: Lightning DDP on two CPU processes, Hydra's joblib and
submitit launchers, and the file lock that makes parallel jobs fine-tune once."""

import json
from pathlib import Path

import pytest

SMOKE = ["+experiment=smoke", "model=resnet18", "stages.latency=false"]


def _reports(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("report.json"))]


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_single_process(run_cli, tmp_path):
    ddp = run_cli(*SMOKE, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "finetune.cache=false",
                  f"paths.log_dir={tmp_path / 'ddp'}")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    reports = _reports(tmp_path / "ddp")
    assert len(reports) == 1  # rank zero alone writes
    out = Path(reports[0]["config"]["paths"]["output_dir"])
    assert (out / "models" / "dense.pt").is_file() and (out / "models" / "pruned.pt").is_file()
    assert reports[0]["config"]["trainer"]["strategy"] == "ddp"

    # The same fine-tuned weights searched by one process, and by two again (no fit this time).
    dense = out / "models" / "dense.pt"
    single = run_cli(*SMOKE, f"finetune.weights_path={dense}", f"paths.log_dir={tmp_path / 'single'}")
    assert single.returncode == 0, single.stderr[-3000:]
    again = run_cli(*SMOKE, f"finetune.weights_path={dense}", "trainer=ddp", "trainer.accelerator=cpu",
                    "trainer.devices=2", f"paths.log_dir={tmp_path / 'ddp2'}")
    assert again.returncode == 0, again.stderr[-3000:]
    s, d, d2 = (_reports(tmp_path / k)[0] for k in ("single", "ddp", "ddp2"))
    assert d["search"]["best_ratio"] == s["search"]["best_ratio"] == d2["search"]["best_ratio"]
    # counts were summed over both ranks: every image of the split is counted exactly once
    assert [c["val_acc"] for c in d["search"]["curve"]] == [c["val_acc"] for c in s["search"]["curve"]]
    assert [c["seen"] for c in d2["search"]["curve"]] == [c["seen"] for c in s["search"]["curve"]]
    assert d["dense"]["test_acc"] == s["dense"]["test_acc"]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["joblib", "local"])
def test_parallel_launcher_jobs_finetune_once(run_cli, tmp_path, launcher):
    ratios = "0.3,0.5,0.7" if launcher == "joblib" else "0.3,0.5"
    r = run_cli(*SMOKE, f"hydra/launcher={launcher}", f"prune.ratio={ratios}", options=("-m",), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(next((tmp_path / "logs").rglob("summary.json")).read_text())["jobs"]
    assert len(summary) == len(ratios.split(","))
    assert sum(not j["finetune_reused"] for j in summary) == 1
    sources = {j["finetune_source"] for j in summary if j["finetune_reused"]}
    assert len(sources) == 1 and next(iter(sources)).endswith("dense.pt")


@pytest.mark.slow
def test_ddp_checkpoint_cadence_agrees_across_ranks(run_cli, tmp_path):
    """Epochs of a second with the default min_interval_s (300) under DDP: the skip decisions are
    collective (a broadcast per epoch end on every rank), the fit ends without a hang, and the last
    epoch alone is saved."""
    r = run_cli(*SMOKE, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_epochs=3",
                "stages.prune=false", "finetune.cache=false", f"paths.log_dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-3000:]
    (ckpts,) = list(tmp_path.rglob("checkpoints"))
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch002.ckpt", "last.ckpt"]


@pytest.mark.slow
def test_ddp_epoch_logging_is_collective_and_logs_every_key(run_cli, tmp_path):
    """The epoch's loss and accuracy are logged through collectives (a sum over ranks, the metric's
    gather): with one validation and one test image on two ranks (Lightning's sampler pads rank 1's
    shard with a repeat), every rank joins them, the fit ends, and the logger gets every key."""
    r = run_cli(*SMOKE, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_epochs=1",
                "stages.prune=false", "finetune.cache=false", "data.train_size=5", "data.test_size=1",
                f"paths.log_dir={tmp_path}", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (csv_file,) = list(tmp_path.rglob("metrics.csv"))
    header = csv_file.read_text().splitlines()[0].split(",")
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= set(header)
    (report,) = _reports(tmp_path)
    assert report["dense"]["test_acc"]["n"] == 1  # the one test image, counted once across ranks
