"""Report sections built from a run's results: the speed a pruned model is credited with, the
timing's spread, the notes a reader needs, and the files written at the end. Pure over result
dicts (what a method's kernels allow is passed in by the pipeline, which asks the registry)."""

from __future__ import annotations

import logging
from pathlib import Path

from prunelab.io import write_json, write_text
from prunelab.report import markdown, plots
from prunelab.report.stats import NOISY_CV, drop_within_noise, speed_verdict

log = logging.getLogger("prunelab")


def headline_speed(report: dict, pruned: dict, can_be_faster: bool) -> None:
    """The pruned model's one speedup (value, paired interval, verdict), where its method can run
    faster than the dense model here (``can_be_faster``); where it runs the dense kernels, the ratio
    stays only as the timing's noise, never as a speedup."""
    lat = report["latency"]
    if can_be_faster:
        pruned["speedup_p50"] = lat["speedup_p50"]
        pruned["speedup"] = {"value": lat["speedup_p50"], "paired_5_95": lat["speedup_paired_5_95"],
                             "verdict": speed_verdict(lat["speedup_paired_5_95"]),
                             "measured_in": lat.get("measured_in", "final timing")}
        chosen = (report.get("search") or {}).get("chosen")
        if chosen is not None and "speedup" not in chosen:  # no final round: this timing is its number
            chosen.update(speedup=lat["speedup_p50"], speedup_paired_5_95=lat["speedup_paired_5_95"],
                          speedup_beyond_noise=lat["speedup_beyond_noise"], speedup_measured_in="final timing")
    else:
        ratio = lat.pop("speedup_p50")
        interval = lat.pop("speedup_paired_5_95")
        lat.pop("speedup_beyond_noise", None)
        lat.setdefault("noise", {"ratio_of_p50s": ratio, "paired_ratio_5_95": interval,
                                 "within_noise": interval[0] <= 1.0 <= interval[1]})


def timing_spread(lat: dict, dense: dict | None, pruned: dict | None) -> None:
    """The coefficient of variation of each model's timings at the headline batch size, and a note
    where it is above ``NOISY_CV``."""
    cv = {tag: st["cv"] for tag, st in (("dense", dense), ("pruned", pruned)) if st and "cv" in st}
    if not cv:
        return
    lat["cv"] = cv
    lat["noisy"] = max(cv.values()) > NOISY_CV
    if lat["noisy"]:
        lat.setdefault("notes", []).append(
            "Timings varied more than the report can stand behind (coefficient of variation "
            + ", ".join(f"{t} {v:.0%}" for t, v in cv.items()) + f", above {NOISY_CV:.0%}): the machine was busy; "
            "the paired interval allows for drift, but rerun on an idle machine before quoting these figures.")


def notes(report: dict, zeros_only: bool) -> list[str]:
    """What a reader of the report must know; ``zeros_only``: the pruned model's method leaves
    zeros in dense tensors (it runs the dense kernels)."""
    out = list(report.get("prune_notes") or [])
    p = report.get("pruned")
    drop = report["dense"]["val_acc"]["value"] - p["val_acc"]["value"] if p else 0.0
    if p and p["ratio"] == 0:
        out.append("Nothing was pruned: no candidate stayed within the tolerance, so the dense model stands; "
                   "the pruned column repeats it, and it is not timed against itself.")
        p = None
    elif p and drop <= 0:
        out.append(f"The pruned model scores {abs(drop):.2f} points at or above the dense model on validation.")
    elif p and drop_within_noise(report["dense"]["val_acc"], p["val_acc"]):
        out.append(
            f"The validation accuracy drop ({report['dense']['val_acc']['value'] - p['val_acc']['value']:.2f} points) "
            "is smaller than the noise of the validation set (half its 95% interval): "
            "dense and pruned are not distinguishable on this data."
        )
    if p and zeros_only and p["ratio"] > 0:
        out.append("Unstructured zeros run on dense kernels: expect no speedup from them, only smaller compressed files.")
    lat_notes = (report.get("latency") or {}).get("notes") or []
    if p and p.get("kernels") and p["kernels"] not in lat_notes:
        out.append(p["kernels"])
    out += lat_notes
    if report["device"]["type"] == "cpu":
        out.append("Latency measured on the CPU; GPU figures need a run with trainer.accelerator=gpu.")
    return out


def write_outputs(report: dict, out: Path) -> None:
    """report.json, report.md and the plots into ``out``; the summary table on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        figs = plots.write_all(report, out)
    except Exception as exc:  # a plot must never cost the results
        log.warning("plots failed: %s", exc)
        figs = {}
    write_json(out / "report.json", report)
    write_text(out / "report.md", markdown.render(report, figs))
    print("\n" + markdown.summary_table(report) + f"\n\nReport: {out / 'report.md'}\n", flush=True)
