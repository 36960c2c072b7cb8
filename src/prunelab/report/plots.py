"""Plots beside report.md: the accuracy curve, latency dense vs pruned, per-layer sparsity."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from prunelab.report.stats import speed_text  # noqa: E402


def _save(fig, path: Path) -> str:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path.name


def accuracy_curve(search: dict, path: Path) -> str:
    curve = search["curve"]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    r = [c["ratio"] for c in curve]
    a = [c["val_acc"] for c in curve]
    ax.plot(r, a, "o-", ms=3, label="val acc (≤ bound where stopped early)")
    for key, style in (("recovered_val_acc", "s--"),):
        if any(key in c for c in curve):
            ax.plot(r, [c.get(key) for c in curve], style, ms=3, label="after recovery")
    ax.axhspan(search["threshold"], search["dense_val_acc"], color="tab:green", alpha=0.15, label="tolerance band")
    ax.axhline(search["dense_val_acc"], color="k", lw=0.8, label="dense")
    ax.axvline(search["best_ratio"], color="tab:red", ls="--", label=f"chosen {search['best_ratio']:.2f}")
    ax.set_xlabel("pruning ratio")
    ax.set_ylabel("validation accuracy (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def latency_bars(dense: dict, pruned: dict, path: Path, speedup: dict | None = None) -> str:
    """Dense and pruned p50/p90 from the timing the report quotes; the title gives the pruned
    model's one speedup (or none, where its method runs the dense kernels)."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.set_title("pruned vs dense: " + (speed_text(speedup["value"], speedup["paired_5_95"]) if speedup else
                                        "same kernels, no speedup expected"), fontsize=8)
    keys = ["p50", "p90"]
    x = range(len(keys))
    ax.bar([i - 0.2 for i in x], [dense[k] for k in keys], 0.4, label="dense")
    ax.bar([i + 0.2 for i in x], [pruned[k] for k in keys], 0.4, label="pruned")
    ax.set_xticks(list(x), keys)
    ax.set_ylabel(f"ms per batch of {dense.get('batch_size', '?')}")
    ax.legend()
    return _save(fig, path)


def layer_sparsity(layers: dict, path: Path) -> str:
    names = list(layers)
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(names)), 3.5))
    ax.bar(range(len(names)), [layers[n]["sparsity"] for n in names])
    ax.set_xticks(range(len(names)), names, rotation=70, fontsize=7)
    ax.set_ylabel("fraction zero")
    ax.set_ylim(0, 1)
    return _save(fig, path)


def accuracy_vs_latency(search: dict, dense: dict, path: Path) -> str:
    """Every measured candidate, one colour per method, Wilson intervals as error bars, the
    tolerance band, the dense model and the chosen point."""
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    for method in search["methods"]:
        pts = [c for c in search["candidates"] if c["method"] == method and c.get("p50_ms") is not None]
        if pts:
            acc = [c["val_acc"] for c in pts]
            err = [[a - c["val_acc_ci95"][0] for a, c in zip(acc, pts, strict=True)],
                   [c["val_acc_ci95"][1] - a for a, c in zip(acc, pts, strict=True)]]
            ax.errorbar([c["p50_ms"] for c in pts], acc, yerr=err, fmt="o", ms=4, capsize=2, label=method)
    lat = dense.get("latency_ms") or {}
    if lat.get("p50"):
        ax.plot([lat["p50"]], [search["dense_val_acc"]], "k*", ms=12, label="dense")
    ax.axhspan(search["threshold"], search["dense_val_acc"], color="tab:green", alpha=0.12, label="tolerance band")
    chosen = search.get("chosen")
    if chosen and chosen.get("p50_ms") is not None:
        speed = (f" ({speed_text(chosen['speedup'], chosen['speedup_paired_5_95'])})"
                 if chosen.get("speedup_paired_5_95") else "")
        ax.plot([chosen["p50_ms"]], [chosen["val_acc"]], "o", ms=14, mfc="none", mec="tab:red", mew=2,
                label=f"chosen: {chosen['method']} {chosen['ratio']:.2f}{speed}")
    ax.set_xlabel("screening p50 latency per batch (ms; each candidate in its own session)")
    ax.set_ylabel("validation accuracy (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def write_all(report: dict, out: Path) -> dict[str, str]:
    plots = {}
    if report.get("search") and "candidates" in report["search"]:
        plots["accuracy vs latency"] = accuracy_vs_latency(report["search"], report["dense"],
                                                           out / "accuracy_vs_latency.png")
    elif report.get("search"):
        plots["accuracy vs ratio"] = accuracy_curve(report["search"], out / "accuracy_vs_ratio.png")
    p = report.get("pruned") or {}
    if report["dense"].get("latency_ms") and p.get("latency_ms"):
        plots["latency"] = latency_bars(report["dense"]["latency_ms"], p["latency_ms"], out / "latency.png",
                                        p.get("speedup") if isinstance(p.get("speedup"), dict) else None)
    if p.get("layers"):
        plots["per-layer sparsity"] = layer_sparsity(p["layers"], out / "layer_sparsity.png")
    return plots
