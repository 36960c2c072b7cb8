"""Hydra callback that writes summary.json and summary.md at the root of a multirun.

Each job writes its own report.json; when the multirun ends this collects them (in job order)
into one table: ratio, accuracies, sparsity, latency, and whether the job fine-tuned or reused.
When the jobs differ in seed, a second table gives each (method, objective) group's mean and
sample sd over its jobs, so a ratio or speedup can be told apart from seed-to-seed noise.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
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
        cfg = r.get("config") or {}
        rows.append({
            "job": report_path.parent.name,
            "seed": cfg.get("seed"),
            # The configured method and objective name the group; "method" is what the job chose.
            "config_method": (cfg.get("prune") or {}).get("method"),
            "objective": (cfg.get("search") or {}).get("objective"),
            "ratio": p.get("ratio"),
            "method": p.get("method"),
            "scope": p.get("scope"),
            "dense_val_acc": r["dense"]["val_acc"]["value"],
            "dense_test_acc": (r["dense"].get("test_acc") or {}).get("value"),
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


# Row keys summarised over seeds ("test_acc", "ratio", "p50_ms" are the chosen candidate's).
SEED_STATS = ("dense_test_acc", "test_acc", "ratio", "dense_p50_ms", "p50_ms")


def _mean_sd(values: list[Any]) -> dict:
    """Mean and sample sd (n - 1) of the values present; a job without a value (a stage switched
    off, no passing ratio) is left out rather than counted as zero. sd is None below two values."""
    xs = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return {"mean": statistics.fmean(xs) if xs else None,
            "sd": statistics.stdev(xs) if len(xs) > 1 else None,
            "n": len(xs)}


def _hashable(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def seed_summary(rows: list[dict]) -> list[dict]:
    """Mean and sample sd over jobs, grouped by (method, objective), in order of first appearance.

    The group's method is the configured ``prune.method`` (falling back to the chosen one) and
    its objective ``search.objective`` (None when the config has none). Every other swept value
    is pooled into the group, so each group lists its jobs and seeds: a repeated seed there means
    something other than the seed varied too.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        method = r.get("config_method") if r.get("config_method") is not None else r.get("method")
        groups.setdefault((_hashable(method), _hashable(r.get("objective"))), []).append(r)
    out = []
    for (method, objective), rs in groups.items():
        g = {"method": list(method) if isinstance(method, tuple) else method,
             "objective": list(objective) if isinstance(objective, tuple) else objective,
             "n": len(rs), "seeds": [r.get("seed") for r in rs], "jobs": [r.get("job") for r in rs]}
        g.update({k: _mean_sd([r.get(k) for r in rs]) for k in SEED_STATS})
        g["chosen_methods"] = [r.get("method") for r in rs]
        out.append(g)
    return out


def _pm(s: dict) -> str:
    if s["mean"] is None:
        return "-"
    return f"{s['mean']:.4g}" if s["sd"] is None else f"{s['mean']:.4g} ± {s['sd']:.2g}"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def write_summary(sweep_dir: Path) -> list[dict]:
    rows = collect(sweep_dir)
    seeds = seed_summary(rows)
    write_json(sweep_dir / "summary.json", {"jobs": rows, "seeds": seeds})
    cols = ["job", "seed", "ratio", "method", "val_acc", "test_acc", "sparsity", "p50_ms", "p90_ms", "finetune_reused"]
    md = ["# prunelab multirun summary", "", table(cols, [tuple(_fmt(r[c]) for c in cols) for r in rows]), ""]
    trained = sum(not r["finetune_reused"] for r in rows)
    md.append(f"{len(rows)} jobs; {trained} fine-tuned, {len(rows) - trained} reused a fine-tuned model.")
    if len({_hashable(r["seed"]) for r in rows}) > 1:  # the table only says something when seeds vary
        scols = ["method", "objective", "jobs", "seeds", "dense test acc", "test acc", "ratio",
                 "dense p50 ms", "p50 ms", "chosen"]
        srows = [(_fmt(g["method"]), _fmt(g["objective"]), str(g["n"]), ",".join(map(_fmt, g["seeds"])),
                  *(_pm(g[k]) for k in SEED_STATS),
                  ",".join(map(_fmt, g["chosen_methods"]))) for g in seeds]
        md += ["", "## Over seeds (mean ± sample sd)", "", table(scols, srows), ""]
    write_text(sweep_dir / "summary.md", "\n".join(md) + "\n")
    return rows


class MultirunSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_summary(sweep_dir)
        print(f"\nprunelab: {len(rows)} job reports summarised in {sweep_dir / 'summary.md'}\n", flush=True)
