"""Hydra callback that writes summary.json and summary.md at the root of a multirun.

Each job writes its own report.json; when the multirun ends this collects them (in job order)
into one table: ratio, accuracies, sparsity, latency, and whether the job fine-tuned or reused.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from prunelab.io import write_json, write_text
from prunelab.report.markdown import table

log = logging.getLogger(__name__)


def collect(sweep_dir: Path) -> list[dict]:
    rows = []
    for report_path in sorted(sweep_dir.glob("*/report.json"), key=lambda p: (len(p.parent.name), p.parent.name)):
        try:
            r = json.loads(report_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("skipping %s: %s", report_path, exc)
            continue
        p = r.get("pruned") or {}
        lat_d, lat_p = r["dense"].get("latency_ms") or {}, p.get("latency_ms") or {}
        rows.append({
            "job": report_path.parent.name,
            "ratio": p.get("ratio"),
            "method": p.get("method"),
            "scope": p.get("scope"),
            "dense_val_acc": r["dense"]["val_acc"]["value"],
            "val_acc": p.get("val_acc", {}).get("value"),
            "test_acc": p.get("test_acc", {}).get("value"),
            "sparsity": p.get("sparsity"),
            "nonzero": p.get("nonzero"),
            "dense_p50_ms": lat_d.get("p50"),
            "p50_ms": lat_p.get("p50"),
            "p90_ms": lat_p.get("p90"),
            "finetune_reused": r["finetune"]["reused"],
            "finetune_source": r["finetune"]["source"],
            "report": str(report_path),
        })
    return rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def write_summary(sweep_dir: Path) -> list[dict]:
    rows = collect(sweep_dir)
    write_json(sweep_dir / "summary.json", {"jobs": rows})
    cols = ["job", "ratio", "method", "val_acc", "test_acc", "sparsity", "p50_ms", "p90_ms", "finetune_reused"]
    md = ["# prunelab multirun summary", "", table(cols, [tuple(_fmt(r[c]) for c in cols) for r in rows]), ""]
    trained = sum(not r["finetune_reused"] for r in rows)
    md.append(f"{len(rows)} jobs; {trained} fine-tuned, {len(rows) - trained} reused a fine-tuned model.")
    write_text(sweep_dir / "summary.md", "\n".join(md) + "\n")
    return rows


class MultirunSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_summary(sweep_dir)
        print(f"\nprunelab: {len(rows)} job reports summarised in {sweep_dir / 'summary.md'}\n", flush=True)
