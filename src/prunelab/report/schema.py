"""The report.json schema: one function per section, and a validator the tests and the
notebook use to check a report before reading it."""

from __future__ import annotations

import platform

import torch

from prunelab.report.stats import accuracy

REQUIRED = {
    "dense": ["val_acc", "test_acc", "params", "nonzero", "latency_ms"],
    "pruned": ["ratio", "val_acc", "test_acc", "nonzero", "sparsity", "latency_ms"],
    "finetune": ["reused", "source"],
    "timing_s": ["finetune", "search", "latency"],
}
# best_ratio_highest is present but null when the search stopped at the first failure (full_curve=false).
SEARCH_REQUIRED = ["tolerance", "scope", "rule", "best_ratio", "best_ratio_highest", "curve"]
CURVE_REQUIRED = ["ratio", "val_acc", "nonzero"]
# A search across methods (search.objective other than sparsity) lists candidates instead of a curve.
ACROSS_REQUIRED = ["tolerance", "objective", "methods", "candidates", "pareto", "chosen", "threshold",
                   "dense_val_acc"]
CANDIDATE_REQUIRED = ["method", "ratio", "val_acc", "val_acc_ci95", "passed"]
ACC_REQUIRED = ["value", "n", "ci95"]


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()} CPU ({torch.get_num_threads()} threads)"
    return {"type": device.type, "name": name, "torch": torch.__version__}


def model_section(val: tuple[int, int], test: tuple[int, int], params: int, weights: dict, latency: dict | None) -> dict:
    return {
        "val_acc": accuracy(*val),
        "test_acc": accuracy(*test),
        "params": params,
        "prunable": weights["params"],
        "nonzero": weights["nonzero"],
        "sparsity": weights["sparsity"],
        "latency_ms": latency,
    }


def validate(report: dict) -> list[str]:
    """Missing or malformed fields, as a list of messages (empty when the report is sound)."""
    problems = []
    for section, keys in REQUIRED.items():
        if section not in report:
            problems.append(f"missing section {section!r}")
            continue
        for k in keys:
            if k not in report[section]:
                problems.append(f"missing {section}.{k}")
    for section in ("dense", "pruned"):
        for k in ("val_acc", "test_acc"):
            acc = report.get(section, {}).get(k)
            if isinstance(acc, dict):
                problems += [f"missing {section}.{k}.{a}" for a in ACC_REQUIRED if a not in acc]
        lat = report.get(section, {}).get("latency_ms")
        if isinstance(lat, dict):
            problems += [f"missing {section}.latency_ms.{q}" for q in ("p50", "p90", "p99") if q not in lat]
    for k in ("device", "config"):
        if k not in report:
            problems.append(f"missing {k!r}")
    search = report.get("search")
    if search is not None and "candidates" in search:
        problems += [f"missing search.{k}" for k in ACROSS_REQUIRED if k not in search]
        for i, c in enumerate(search["candidates"]):
            problems += [f"missing search.candidates[{i}].{k}" for k in CANDIDATE_REQUIRED if k not in c]
    elif search is not None:
        problems += [f"missing search.{k}" for k in SEARCH_REQUIRED if k not in search]
        for i, c in enumerate(search.get("curve", [])):
            problems += [f"missing search.curve[{i}].{k}" for k in CURVE_REQUIRED if k not in c]
    p = report.get("pruned", {})
    if "sparsity" in p and not 0.0 <= p["sparsity"] <= 1.0:
        problems.append("pruned.sparsity outside [0, 1]")
    return problems
