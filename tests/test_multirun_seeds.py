"""Seed-variance summary of a multirun, from fake job folders holding report.json files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from prunelab.multirun import seed_summary, write_summary


def fake_report(seed, dense_test, test, ratio, dense_p50, p50, method="magnitude", chosen=None, objective=None):
    search = {"objective": objective} if objective is not None else {}
    return {
        "config": {"seed": seed, "prune": {"method": method}, "search": search},
        "dense": {"val_acc": {"value": 92.0}, "test_acc": {"value": dense_test}, "latency_ms": {"p50": dense_p50}},
        "pruned": {"ratio": ratio, "method": chosen or method, "scope": "global", "val_acc": {"value": 91.5},
                   "test_acc": {"value": test}, "sparsity": ratio, "nonzero": 10,
                   "latency_ms": {"p50": p50, "p90": p50 * 1.2}},
        "finetune": {"reused": seed != 0, "source": "x"},
    }


def write_jobs(root, reports):
    for i, r in enumerate(reports):
        (root / str(i)).mkdir()
        (root / str(i) / "report.json").write_text(json.dumps(r))


JOBS = [  # seed, dense test, chosen test, ratio, dense p50, chosen p50
    (0, 91.2, 90.5, 0.62, 10.0, 4.1),
    (1, 90.8, 90.1, 0.58, 10.4, 4.5),
    (2, 91.5, 90.9, 0.66, 9.8, 3.9),
]


def test_three_seeds_mean_and_sd_match_numpy(tmp_path):
    write_jobs(tmp_path, [fake_report(*j) for j in JOBS])
    rows = write_summary(tmp_path)
    assert [r["seed"] for r in rows] == [0, 1, 2]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["jobs"][0]["seed"] == 0 and summary["jobs"][0]["dense_test_acc"] == 91.2
    (g,) = summary["seeds"]
    assert (g["method"], g["objective"], g["n"], g["seeds"]) == ("magnitude", None, 3, [0, 1, 2])
    assert g["chosen_methods"] == ["magnitude"] * 3
    cols = np.array(JOBS, dtype=float)
    for k, key in enumerate(["dense_test_acc", "test_acc", "ratio", "dense_p50_ms", "p50_ms"], start=1):
        assert g[key]["mean"] == pytest.approx(cols[:, k].mean())
        assert g[key]["sd"] == pytest.approx(cols[:, k].std(ddof=1))
        assert g[key]["n"] == 3
    md = (tmp_path / "summary.md").read_text()
    assert "| seed" in md and "Over seeds" in md
    assert f"{cols[:, 3].mean():.4g} ± {cols[:, 3].std(ddof=1):.2g}" in md


def test_single_seed_has_no_sd(tmp_path):
    write_jobs(tmp_path, [fake_report(*JOBS[0])])
    write_summary(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    (g,) = summary["seeds"]
    assert g["n"] == 1
    assert g["test_acc"] == {"mean": 90.5, "sd": None, "n": 1}
    assert all(g[k]["sd"] is None for k in ("dense_test_acc", "ratio", "dense_p50_ms", "p50_ms"))
    # One seed: nothing varies over seeds, so the markdown keeps only the job table.
    assert "Over seeds" not in (tmp_path / "summary.md").read_text()


def test_groups_by_method_and_objective_and_skips_missing_values(tmp_path):
    reports = [fake_report(*j, method="channel", objective="latency") for j in JOBS]
    reports += [fake_report(*j, method="channel", objective="sparsity") for j in JOBS[:2]]
    reports.append(fake_report(*JOBS[2], method="auto", chosen="channel"))
    reports.append(fake_report(*JOBS[0], method="auto", chosen="magnitude"))
    reports[-1]["pruned"]["latency_ms"] = None  # latency stage off in this job
    write_jobs(tmp_path, reports)
    groups = seed_summary(write_summary(tmp_path))
    assert [(g["method"], g["objective"], g["n"]) for g in groups] == [
        ("channel", "latency", 3), ("channel", "sparsity", 2), ("auto", None, 2)]
    auto = groups[2]
    assert auto["chosen_methods"] == ["channel", "magnitude"]
    assert auto["p50_ms"] == {"mean": 3.9, "sd": None, "n": 1}  # the missing latency is not a zero
    assert auto["ratio"]["sd"] == pytest.approx(np.std([0.66, 0.62], ddof=1))


def test_seed_summary_is_pure_on_rows():
    rows = [{"job": "0", "seed": 0, "method": "magnitude", "test_acc": 90.0},
            {"job": "1", "seed": 1, "method": "magnitude", "test_acc": 91.0}]
    (g,) = seed_summary(rows)
    assert g["test_acc"]["mean"] == pytest.approx(90.5)
    assert g["test_acc"]["sd"] == pytest.approx(np.std([90.0, 91.0], ddof=1))
    assert g["dense_p50_ms"] == {"mean": None, "sd": None, "n": 0}
    assert seed_summary([]) == []
