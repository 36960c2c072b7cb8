"""Shared fixtures: configs composed the way the app composes them, with tmp output dirs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prunelab
from prunelab.compose import compose

CONF_DIR = Path(prunelab.__file__).parent / "conf"
REPO = Path(__file__).resolve().parents[1]
SUBSET = REPO.parent / "shared" / "data" / "cifar10-subset"

# Under pytest-xdist (`make test` runs two workers) the cores are shared out, one torch thread
# per worker on a 2-core machine: two workers of two threads each on two cores made the
# compute-heavy tests several times slower (OpenMP threads spinning against each other).
# Subprocesses started by tests (the CLI) inherit the same share through OMP_NUM_THREADS.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, min(2, os.cpu_count() or 1) // _WORKERS)
torch.set_num_threads(THREADS)
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(THREADS)


def compose_cfg(tmp_path: Path, overrides: list[str]):
    """Compose ``train.yaml`` like the app does, with every path under ``tmp_path``. Latency is
    timed in the deploy runtime unless a test names one: ``auto`` (the default) would build and time
    every installed runtime first, which tests of other things need not pay for (test_auto does)."""
    if not any(o.lstrip("+~").startswith("latency.runtime") for o in overrides):
        overrides = [*overrides, "latency.runtime=deploy"]
    return compose(overrides, tmp_path)


# Small but learnable: resnet18 separates the synthetic classes in a few dozen CPU steps.
FAST_LEARNER = [
    "+experiment=smoke",
    "model=resnet18",
    "data.train_size=960",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=12",
]


@pytest.fixture
def run_cli(tmp_path):
    """Run ``python -m prunelab.train`` in a subprocess with logs under tmp_path."""

    def _run(*overrides: str, options: tuple = (), timeout: int = 600, cwd: Path | None = None, env: dict | None = None):
        # argparse wants the flags (-m, --cfg job) before the overrides
        cmd = [sys.executable, "-m", "prunelab.train", *options, *overrides]
        if not any(a.startswith("paths.log_dir=") for a in overrides):
            cmd.append(f"paths.log_dir={tmp_path / 'logs'}")
        full_env = dict(os.environ, HYDRA_FULL_ERROR="0", **(env or {}))
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd or tmp_path, env=full_env)

    return _run


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
