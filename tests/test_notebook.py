"""Runs notebooks/report.ipynb end to end against a small, schema-faithful report.json."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "report.ipynb"
Z95 = 1.959963984540054


def _acc(correct: int, n: int) -> dict:
    """Accuracy in percent with a Wilson 95% interval, as the report stores it."""
    p = correct / n
    denom = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denom
    return {"value": 100.0 * p, "correct": correct, "n": n, "ci95": [100 * (centre - half), 100 * (centre + half)]}


def _latency(p50: float, batch_size: int = 128) -> dict:
    return {"p50": p50, "p90": p50 * 1.08, "p99": p50 * 1.21, "batch_size": batch_size,
            "images_per_s": batch_size / (p50 / 1000.0)}


def make_report() -> dict:
    """A report like a searched magnitude-pruning run on 5,000 validation images, 3 prunable layers."""
    n_val, n_test = 5000, 10000
    dense_correct = 4561  # 91.22%
    dense_val = 100.0 * dense_correct / n_val
    tolerance = 1.0
    threshold = dense_val - tolerance
    layers_params = {"features.0.weight": 1728, "features.3.weight": 73728, "classifier.weight": 5120}
    prunable = sum(layers_params.values())

    # (ratio, correct, seen, stopped): 0.6 dips below the band, 0.7 is back inside it (a noisy curve),
    # 0.9 stopped early at 1,300 images, on its 490th mistake (one more than the 489 a pass allows),
    # so its accuracy is an upper bound just below the threshold.
    evaluated = [(0.3, 4560, n_val, False), (0.5, 4549, n_val, False), (0.6, 4509, n_val, False),
                 (0.7, 4520, n_val, False), (0.8, 4395, n_val, False), (0.9, 810, 1300, True)]
    curve = []
    for ratio, correct, seen, stopped in evaluated:
        acc = 100.0 * (correct + (n_val - seen if stopped else 0)) / n_val
        passed = not stopped and correct * 100.0 >= threshold * n_val
        curve.append({"ratio": ratio, "correct": correct, "seen": seen, "total": n_val, "stopped": stopped,
                      "nonzero": prunable - int(round(ratio * prunable)), "val_acc": acc,
                      "acc_is_bound": stopped, "passed": passed})
    best_contiguous = 0.5
    best_highest = 0.7
    assert [c["passed"] for c in curve] == [True, True, False, True, False, False]
    assert curve[-1]["val_acc"] < threshold  # a stopped candidate's bound already fails

    ratio = best_contiguous
    # Global pruning removes round(ratio * prunable) weights, unevenly across layers.
    zeros_total = int(round(ratio * prunable))
    zeros = {"features.0.weight": 605, "classifier.weight": 2816}
    zeros["features.3.weight"] = zeros_total - sum(zeros.values())
    layers = {name: {"params": n, "zeros": zeros[name], "sparsity": zeros[name] / n}
              for name, n in layers_params.items()}
    total_params = prunable + 314  # biases and norms are not pruned

    dense = {"val_acc": _acc(dense_correct, n_val), "test_acc": _acc(9088, n_test), "params": total_params,
             "prunable": prunable, "nonzero": prunable, "sparsity": 0.0, "latency_ms": _latency(4.12)}
    pruned = {"val_acc": _acc(4549, n_val), "test_acc": _acc(9071, n_test), "params": total_params,
              "prunable": prunable, "nonzero": prunable - zeros_total, "sparsity": zeros_total / prunable,
              "latency_ms": _latency(4.09), "ratio": ratio, "method": "magnitude", "scope": "global",
              "layers": layers, "speedup_p50": 4.12 / 4.09}
    search = {"tolerance": tolerance, "rule": "contiguous", "dense_val_acc": dense_val, "threshold": threshold,
              "best_ratio": best_contiguous, "best_ratio_highest": best_highest,
              "best_ratio_contiguous": best_contiguous, "curve": curve, "scope": "global",
              "images_evaluated": sum(c["seen"] for c in curve)}
    return {
        "dense": dense,
        "search": search,
        "pruned": pruned,
        "finetune": {"reused": False, "source": None},
        "timing_s": {"finetune": 812.4, "search": 95.3, "latency": 6.1},
        "device": {"type": "cuda", "name": "NVIDIA H100 80GB HBM3", "torch": "2.14.1"},
        "notes": [],
        "config": {"prune": {"method": "magnitude", "scope": "global", "ratio": None},
                   "search": {"tolerance": tolerance, "rule": "contiguous"}},
    }


@pytest.fixture(scope="session")
def python3_kernel() -> str:
    """Make sure a ``python3`` kernelspec exists; install one for this user if it does not."""
    from jupyter_client.kernelspec import KernelSpecManager

    if "python3" not in KernelSpecManager().find_kernel_specs():
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--user", "--name", "python3"],
                       check=True, capture_output=True)
    return "python3"


def _execute(report: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel: str):
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    monkeypatch.setenv("PRUNELAB_REPORT", str(path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name=kernel,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError when a cell fails
    return nb


def _text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif "data" in out:
            parts.append(out["data"].get("text/plain", ""))
    return "".join(parts)


def _tagged(nb, tag: str):
    return next(c for c in nb.cells if tag in c.get("metadata", {}).get("tags", []))


def test_notebook_is_stored_clean():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert nb.cells[0].cell_type == "markdown"
    assert 'REPORT = os.environ.get("PRUNELAB_REPORT", "report.json")' in code[0].source


def test_fixture_matches_schema():
    schema = pytest.importorskip("prunelab.report.schema")
    assert schema.validate(make_report()) == []


def test_notebook_runs_on_searched_report(tmp_path, monkeypatch, python3_kernel):
    report = make_report()
    nb = _execute(report, tmp_path, monkeypatch, python3_kernel)
    table = _text(_tagged(nb, "summary-table"))
    assert f"{report['pruned']['ratio']:.2f}" in table
    assert report["device"]["name"] in table
    assert "Schema problems" not in "".join(_text(c) for c in nb.cells if c.cell_type == "code")
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3  # curve, latency, per-layer sparsity


def test_notebook_runs_without_search_or_latency(tmp_path, monkeypatch, python3_kernel):
    report = make_report()
    del report["search"]
    report["pruned"]["ratio"] = 0.4
    report["dense"]["latency_ms"] = None
    report["pruned"]["latency_ms"] = None
    del report["pruned"]["speedup_p50"]
    nb = _execute(report, tmp_path, monkeypatch, python3_kernel)
    text = "".join(_text(c) for c in nb.cells if c.cell_type == "code")
    assert "0.40" in _text(_tagged(nb, "summary-table"))
    assert "No search in this report" in text
    assert "No latency in this report" in text


def test_notebook_reports_missing_file(tmp_path, monkeypatch, python3_kernel):
    monkeypatch.setenv("PRUNELAB_REPORT", str(tmp_path / "nope" / "report.json"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name=python3_kernel,
                                     resources={"metadata": {"path": str(tmp_path)}})
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="No report at"):
        client.execute()


@pytest.mark.parametrize("text, says", [
    ('{"accuracy": 0.9, "ratio": 0.5}', "is not a prunelab report (no 'dense' section)"),
    ("[1, 2, 3]", "is not a prunelab report (no 'dense' section)"),
    ("val_acc,ratio\n91.2,0.5\n", "is not JSON"),
    ('{"jobs": [], "seeds": {}}', "is a multirun's summary, not a run's report"),
])
def test_notebook_says_in_one_line_what_is_not_a_report(tmp_path, monkeypatch, python3_kernel, text, says):
    path = tmp_path / "other.json"
    path.write_text(text)
    monkeypatch.setenv("PRUNELAB_REPORT", str(path))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name=python3_kernel,
                                     resources={"metadata": {"path": str(tmp_path)}})
    with pytest.raises(nbclient.exceptions.CellExecutionError) as err:
        client.execute()
    assert says in str(err.value) and "KeyError" not in str(err.value)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert len(errors) == 1 and len(errors[0].traceback) == 1  # one line, no traceback
    assert errors[0].traceback[0].startswith("ReportError: ") and str(path) in errors[0].traceback[0]
    assert "PRUNELAB_REPORT" in errors[0].traceback[0] or "report.json" in errors[0].traceback[0]


def make_across_report() -> dict:
    """The same run searched with search.objective=latency across magnitude and channel."""
    report = make_report()
    s = report["search"]
    cands = []
    for method, ratio, correct, p50, passed in [("magnitude", 0.3, 4560, 4.12, True), ("magnitude", 0.5, 4549, 4.12, True),
                                                ("channel", 0.2, 4555, 3.1, True), ("channel", 0.4, 4540, 2.2, True),
                                                ("channel", 0.6, 4380, None, False)]:
        acc = _acc(correct, 5000)
        cands.append({"method": method, "ratio": ratio, "val_acc": acc["value"], "val_acc_ci95": acc["ci95"],
                      "passed": passed, "p50_ms": p50, "acc_is_bound": False, "seen": 5000, "paired": None})
    front = [cands[3], cands[2], cands[0]]
    report["search"] = {"objective": "latency", "methods": ["magnitude", "channel"], "candidates": cands,
                        "pareto": front, "chosen": cands[3], "tolerance": s["tolerance"], "threshold": s["threshold"],
                        "dense_val_acc": s["dense_val_acc"], "confidence": None}
    report["pruned"].update(method="channel", ratio=0.4)
    return report


def test_fixture_across_matches_schema():
    schema = pytest.importorskip("prunelab.report.schema")
    assert schema.validate(make_across_report()) == []


def test_notebook_shows_the_front_of_a_search_across_methods(tmp_path, monkeypatch, python3_kernel):
    nb = _execute(make_across_report(), tmp_path, monkeypatch, python3_kernel)
    text = "".join(_text(c) for c in nb.cells if c.cell_type == "code")
    assert "Pareto front" in text and "channel                  ratio 0.40" in text
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3  # accuracy vs latency, latency, per-layer sparsity
