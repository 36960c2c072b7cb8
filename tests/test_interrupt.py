"""Interruptions lose nothing: SIGKILL mid fine-tune or mid search, then resume; atomic writes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import FAST_LEARNER

# One intra-op thread: on a loaded 2-core machine two threads spin-wait on each other and each step
# of these runs took seconds instead of a tenth of one. (More kill points: test_kill_points.py.)
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def _spawn(args: list[str], tmp_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "prunelab.train", *args, f"paths.log_dir={tmp_path / 'logs'}"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path,
                            start_new_session=True, env=dict(os.environ, **ONE_THREAD))


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        found = predicate()
        if found:
            return found
        if proc.poll() is not None:
            raise AssertionError(f"process ended before the kill point: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.2)
    raise AssertionError("timed out waiting for the kill point")


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_finetune_killed_resumes_from_last_ckpt(run_cli, tmp_path):
    args = ["+experiment=smoke", "model=resnet18", "trainer.max_epochs=12", "trainer.limit_train_batches=4",
            "stages.prune=false", "stages.latency=false", "finetune.cache=false",
            "callbacks.model_checkpoint.min_interval_s=0"]  # every (second-long) epoch saved, so a kill finds one
    proc = _spawn(args, tmp_path)
    ckpt = _wait_for(lambda: next((tmp_path / "logs").rglob("checkpoints/last.ckpt"), None), proc)
    _kill(proc)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] < 48  # it really was interrupted
    r = run_cli(*args, f"ckpt_path={ckpt}", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    last = sorted((tmp_path / "logs").rglob("checkpoints/last.ckpt"), key=os.path.getmtime)[-1]
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 48


def test_search_killed_resumes_from_journal_with_same_answer(run_cli, tmp_path):
    args = FAST_LEARNER + ["search.grid=[0.3,0.6,0.9]", "search.refine_step=0.05", "stages.latency=false"]
    proc = _spawn(args, tmp_path)

    def two_entries():
        for j in (tmp_path / "logs").rglob("journal-*.json"):
            try:
                if len(json.loads(j.read_text())["evaluations"]) >= 2:
                    return j
            except (json.JSONDecodeError, KeyError):
                pytest.fail(f"journal {j} was read half-written")
        return None

    journal = _wait_for(two_entries, proc)
    _kill(proc)
    done_before = len(json.loads(journal.read_text())["evaluations"])
    assert not list((tmp_path / "logs").rglob("report.json"))
    r = run_cli(*args, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = json.loads(next((tmp_path / "logs").rglob("report.json")).read_text())
    assert resumed["finetune"]["reused"] is True
    assert resumed["search"]["resumed_candidates"] >= done_before >= 2
    # a reference search from scratch on the same weights reaches the same answer
    ref = run_cli(*args, f"finetune.weights_path={resumed['finetune']['source']}", "finetune.cache=false",
                  f"paths.log_dir={tmp_path / 'ref'}", env=ONE_THREAD)
    assert ref.returncode == 0, ref.stderr[-3000:]
    reference = json.loads(next((tmp_path / "ref").rglob("report.json")).read_text())
    assert reference["search"]["best_ratio"] == resumed["search"]["best_ratio"]
    assert [c["val_acc"] for c in reference["search"]["curve"]] == [c["val_acc"] for c in resumed["search"]["curve"]]


WRITER = """
import sys, torch
from prunelab.io import save_state_dict, write_json
state = {"w": torch.randn(4_000_000)}
i = 0
while True:
    i += 1
    state["step"] = torch.tensor(i)
    save_state_dict(sys.argv[1] + "/dense.pt", state)
    write_json(sys.argv[1] + "/report.json", {"step": i, "pad": "x" * 2_000_000})
"""


def test_killed_writer_never_leaves_a_truncated_file(tmp_path):
    for delay in (0.3, 0.9, 1.7):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)])
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for name in ("dense.pt", "report.json"):
            path = tmp_path / name
            if path.exists():  # either absent or complete, never torn
                if name.endswith(".pt"):
                    state = torch.load(path, weights_only=True)
                    assert state["w"].numel() == 4_000_000
                else:
                    assert json.loads(path.read_text())["step"] >= 1
