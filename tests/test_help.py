"""What the commands print: ``--help`` describes prunelab, the export's help path imports no
torch, and every log line of a run is printed once."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter


def test_train_help_describes_prunelab(run_cli):
    r = run_cli(options=("--help",))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for text in ("prunelab", "+experiment", "smoke", "sweep", "fast", "report.json", "report.md", "models/",
                 "logs/<task_name>/runs/<timestamp>/", "python -m prunelab.export", "-m prune.ratio="):
        assert text in out, text
    for group in ("data", "model", "trainer", "prune", "search", "latency", "finetune", "paths"):
        assert re.search(rf"^\s+{group}\s+\S", out, re.M), group  # one line describing each group
    assert "is powered by Hydra" not in out  # not Hydra's generic text


def test_export_help_path_imports_no_torch():
    code = ("import sys\nimport prunelab.export as e\ntry:\n    e.main(['--help'])\nexcept SystemExit as x:\n"
            "    assert x.code in (0, None), x.code\nsys.exit(3 if 'torch' in sys.modules else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr or "torch was imported"
    assert "usage" in r.stdout.lower()


# "[2026-01-01 10:00:00,000][name][INFO] - message" (Hydra's job logging) or "INFO: message" (Lightning's own)
LOG_LINE = re.compile(r"^(?:\[[^\]]+\]\[[^\]]+\]\[[A-Z]+\] - |(?:DEBUG|INFO|WARNING|ERROR|CRITICAL): )(.+)$")


def test_each_log_line_printed_once(run_cli, tmp_path):
    r = run_cli("+experiment=smoke", "stages.prune=false", "stages.latency=false", "trainer.max_epochs=1",
                "trainer.limit_train_batches=1", "model=resnet18", "data.train_size=64", "data.test_size=32",
                f"paths.log_dir={tmp_path / 'logs'}")
    assert r.returncode == 0, r.stderr[-3000:]
    messages = [m.group(1).strip() for line in (r.stdout + "\n" + r.stderr).splitlines()
                if (m := LOG_LINE.match(line)) and m.group(1).strip()]
    assert any("Trainer.fit" in m for m in messages), messages  # Lightning's lines are among them
    twice = [m for m, n in Counter(messages).items() if n > 1]
    assert not twice, twice
