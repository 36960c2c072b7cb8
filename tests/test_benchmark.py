"""benchmarks/: the notebook-procedure helpers (fast) and one quick end-to-end comparison (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from conftest import compose_cfg
from prunelab.pruning.masks import magnitude_masks, prunable_weights
from prunelab.search.rules import pick

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks/ is a top-level package of the checkout, not installed
    sys.path.insert(0, str(REPO))

from benchmarks import common, compare, isolated  # noqa: E402
from benchmarks import notebook_procedure as nb  # noqa: E402


# -- refinement grid and rules -------------------------------------------------------------------
def test_refinement_grid_is_strictly_between_in_notebook_arithmetic():
    grid = nb.refinement_grid(0.4, 0.5, 0.01)
    assert len(grid) == 9
    assert grid == [0.4 + 0.01 * i for i in range(1, 10)]  # unrounded, as the notebook wrote its grid
    assert all(0.4 < r < 0.5 for r in grid)
    assert nb.refinement_grid(0.25, 0.35, 0.01)[8] == 0.25 + 0.01 * 9  # 0.33999999999999997
    assert nb.refinement_grid(0.0, 0.2, 0.01)[0] == 0.01 and len(nb.refinement_grid(0.0, 0.2, 0.01)) == 19
    assert nb.refinement_grid(0.3, 0.6, 0.1) == pytest.approx([0.4, 0.5])
    with pytest.raises(ValueError):
        nb.refinement_grid(0.1, 0.2, 0.0)


def test_refinement_span_per_rule():
    monotone = [(0.2, True), (0.3, True), (0.4, True), (0.5, False), (0.6, False)]
    assert nb.refinement_span(monotone, "contiguous") == (0.4, 0.5)
    assert nb.refinement_span(monotone, "highest") == (0.4, 0.5)
    noisy = [(0.2, True), (0.3, False), (0.4, True), (0.5, False)]
    assert nb.refinement_span(noisy, "contiguous") == (0.2, 0.3)
    assert nb.refinement_span(noisy, "highest") == (0.4, 0.5)
    assert nb.refinement_span([(0.2, False), (0.3, False)], "contiguous") == (0.0, 0.2)
    assert nb.refinement_span([(0.2, True), (0.3, True)], "contiguous") is None


@given(st.lists(st.tuples(st.integers(1, 99), st.booleans()), max_size=20, unique_by=lambda t: t[0]),
       st.sampled_from(nb.RULES))
def test_answer_agrees_with_prunelab_pick(pairs, rule):
    curve = [(r / 100, ok) for r, ok in pairs]
    assert nb.answer(curve, rule) == pick(curve, rule)


def test_passes_is_inclusive():
    assert nb.passes(88.21, 89.21, 1.0) and not nb.passes(88.2, 89.21, 1.0)


def test_p50_p90_is_numpy_percentile():
    assert nb.p50_p90([1.0, 2.0, 3.0, 4.0]) == (2.5, 3.7)


# -- pruning: the notebook's l1_unstructured matches prunelab's layerwise masks -----------------------
def test_notebook_pruning_matches_prunelab_layerwise():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    keep = magnitude_masks(prunable_weights(model), 0.37, scope="layerwise")
    nb.prune_layerwise(model, 0.37)
    for name, w in prunable_weights(model).items():
        assert not hasattr(model.get_submodule(name), "weight_orig")  # reparametrisation removed
        assert torch.equal(w != 0, keep[name])
        assert int((w == 0).sum()) == round(0.37 * w.numel())


def test_build_model_replaces_the_head():
    m = nb.build_model("resnet18", num_classes=10)
    assert m.fc.out_features == 10


# -- report helpers ------------------------------------------------------------------------------
def test_ratios_are_prunelab_over_notebook():
    r = compare.ratios({"a": 4.0, "b": 0.0, "c": None}, {"a": 1.0, "b": 2.0, "c": 3.0}, keys=("a", "b", "c"))
    assert r == {"a": 0.25, "b": None, "c": None}


def test_memory_goal_is_the_peak_above_the_pre_model_baseline_in_models():
    mb = 100
    pl = {"model_bytes": mb, "search_peak_rss": 900, "search_peak_rss_above_baseline": 220}
    ratio = {"search_wall_s": 0.09, "finetune_images_per_s": 1.2, "finetune_images_per_s_fast": 1.6}
    g = compare.goals({}, pl, ratio, True)["search_peak_rss_lt_2.5x_model"]
    assert g["measured"] == 2.2 and g["met"] and g["measured_absolute"] == 9.0 and "baseline" in g["definition"]
    assert not compare.goals({}, dict(pl, search_peak_rss_above_baseline=260), ratio, True)[
        "search_peak_rss_lt_2.5x_model"]["met"]


def test_peak_window_sees_an_allocation_after_the_baseline():
    baseline, reset = isolated.start_peak_window()
    x = torch.ones(25_000_000)  # 100 MB, touched
    del x
    m = isolated.peak_since(baseline, reset)
    assert m["search_peak_rss"] >= m["search_rss_baseline"] + m["search_peak_rss_above_baseline"] - 2**20
    assert m["search_peak_rss_above_baseline"] >= 90e6


def test_device_slug_cpu():
    assert common.device_slug(torch.device("cpu"), 2) == "cpu-2threads"


# -- end to end --------------------------------------------------------------------------------------
TOP = {"device", "date", "notebook", "prunelab", "ratio", "same_answer", "setup"}
SETUP = {"data", "weights", "epochs", "batch_size", "threads", "torch", "loadavg_start"}


@pytest.mark.slow
def test_quick_comparison_writes_schema(tmp_path):
    out = tmp_path / "results"
    r = subprocess.run([sys.executable, "-m", "benchmarks.compare", "--quick", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    files = sorted(out.iterdir())
    assert [f.suffix for f in files] == [".json", ".md"], files
    assert files[0].stem == files[1].stem
    report = json.loads(files[0].read_text())
    assert TOP <= set(report)
    assert SETUP <= set(report["setup"])
    assert files[0].stem == f"{report['date']}-{report['device']}"
    assert isinstance(report["same_answer"], bool)
    for key in compare.METRICS:
        nb_v, pl_v = report["notebook"][key], report["prunelab"][key]
        assert nb_v > 0 and pl_v > 0, key
        assert report["ratio"][key] == pytest.approx(pl_v / nb_v), key
    assert report["same_answer"] == (report["notebook"]["best_ratio_contiguous"] == report["prunelab"]["best_ratio"])
    # every search image is counted: the notebook evaluates the whole split for each candidate + dense
    val = report["setup"]["val_images"]
    assert report["notebook"]["search_images"] == val * (report["notebook"]["candidates"] + 1)
    assert report["prunelab"]["search_images"] <= val * (report["prunelab"]["candidates"] + 1)
    assert "| search wall time (s) |" in files[1].read_text()


@pytest.mark.slow
def test_pruning_pays_quick_runs_end_to_end(tmp_path):
    from benchmarks import pruning_pays

    assert pruning_pays.main(["--quick", "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out")]) == 0
    (js,) = (tmp_path / "out").glob("*-pruning-pays-*.json")
    res = json.loads(js.read_text())["results"]
    assert set(res["searches"]) == {"channel_oneshot", "channel_iterative", "magnitude_oneshot", "magnitude_iterative"}
    assert res["latency"]["dense"]["speedup_p50"] == 1.0 and res["latency"]["channel_0.5"]["batch"] == 16
    assert all(v < 1e-4 for v in res["onnx_max_abs_diff"].values())
    assert res["channel_0.5"]["macs"] < res["channel_0.5"]["dense_macs"]
    assert {"default", "fast"} == set(res["pipeline_channel_0.5"])


def test_fastest_goal_is_not_met_by_the_same_model_timed_twice():
    from benchmarks.fastest import beats_sparsity

    answers = {"latency_search": ["channel", 0.04], "sparsity_channel": ["channel", 0.04],
               "sparsity_magnitude": ["magnitude", 0.5]}
    speedups = {"latency_search_deploy": 2.47, "sparsity_channel_deploy": 2.46, "sparsity_magnitude_deploy": 2.1}
    goal = beats_sparsity(answers, speedups)
    assert goal["met"] is False and "same model" in goal["why"]
    # different models: met only when the paired per-iteration ratios beat 1 at their slow end
    answers["latency_search"] = ["channel", 0.3]
    speedups["latency_search_deploy"] = 3.0
    faster = {"sparsity_channel_deploy": [10.0, 11.0, 10.5, 10.2], "latency_search_deploy": [8.0, 8.1, 8.2, 7.9]}
    assert beats_sparsity(answers, speedups, faster)["met"] is True
    noisy = {"sparsity_channel_deploy": [10.0, 8.0, 10.5, 7.5], "latency_search_deploy": [9.0, 9.1, 9.2, 8.9]}
    assert beats_sparsity(answers, speedups, noisy)["met"] is False
    assert beats_sparsity({"sparsity_channel": ["channel", 0.1]}, {"sparsity_channel_deploy": 1.2})["met"] is False


def test_finetune_scale_separates_the_first_epoch_from_the_steady_state():
    from benchmarks.finetune_scale import summarize

    s = summarize({"epoch_s": [10.0, 2.0, 4.0, 2.0, 20.0], "fit_s": 38.0, "train_images": 500}, per_epoch=100)
    assert s["first_epoch_images_per_s"] == 10.0  # compile and warm-up land in epoch 1
    assert s["steady_images_per_s"] == 50.0  # the median of the middle epochs (50, 25, 50): not the final save's
    assert s["fit_images_per_s"] == 500 / 38.0
    assert summarize({"epoch_s": [10.0, 4.0], "fit_s": 14.0, "train_images": 200}, 100)["steady_images_per_s"] == 25.0
    assert summarize({"epoch_s": [4.0], "fit_s": 4.0, "train_images": 100}, 100)["steady_images_per_s"] == 25.0


@pytest.mark.slow
def test_finetune_scale_quick_runs_every_procedure_for_whole_epochs(tmp_path):
    from benchmarks.finetune_scale import PROCEDURES, main

    res = main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".md"]
    assert tuple(res["procedures"]) == PROCEDURES
    for name, r in res["procedures"].items():
        assert len(r["epoch_s"]) == 2 and all(t > 0 for t in r["epoch_s"]), name
    assert res["procedures"]["fast"]["settings"]["on_device"] and not res["procedures"]["defaults"]["settings"]["on_device"]
    assert res["goal"]["applies"] is False and res["goal"]["met"] is None  # the 10x goal is an H100 goal


def test_finetune_scale_records_a_failed_procedure_and_saves_after_each(monkeypatch, tmp_path):
    import argparse

    from benchmarks import finetune_scale as fs

    def fake_child(target, spec):
        if spec["procedure"] == "fast":
            raise RuntimeError("child failed (exit code 1):\nTraceback ...\nRuntimeError: no kernel image")
        return {"epoch_s": [4.0, 2.0, 2.0], "fit_s": 8.0, "train_images": 240, "settings": {}}

    monkeypatch.setattr(fs, "run_child", fake_child)
    saved = []
    args = argparse.Namespace(device="cpu", train_size=100, arch="resnet18", epochs=3, num_workers=0,
                              procedures=list(fs.PROCEDURES))
    res = fs.measure(args, save=lambda r: saved.append(sorted(r["procedures"]) + sorted(r["errors"])))
    assert saved == [["notebook"], ["notebook", "fast"], ["defaults", "notebook", "fast"]]
    assert "no kernel image" in res["errors"]["fast"] and res["goal"]["fast_vs_notebook_steady"] is None
    assert res["steady_vs_notebook"] == {"defaults": 1.0}
    md = fs.render(res)
    assert "fast failed" in md and "RuntimeError: no kernel image" in md and "not measured" in md


def test_finetune_scale_variants_differ_only_in_their_overrides(tmp_path):
    from benchmarks import finetune_scale as fs

    spec = {"work_dir": str(tmp_path), "train_size": 100, "arch": "resnet18", "epochs": 1, "device": "cpu",
            "num_workers": 0}
    cfgs = {name: fs._cfg(spec, name) for name in fs.VARIANTS}
    assert cfgs["fast"].model.compile_mode == "reduce-overhead"
    assert cfgs["fast-compile-default"].model.compile_mode == cfgs["defaults"].model.compile_mode == "default"
    assert cfgs["fast"].data.on_device and cfgs["fast-compile-default"].data.on_device
    assert not cfgs["defaults"].data.on_device
    assert "fast-compile-default" not in fs.PROCEDURES  # run only when asked: it costs the GPU check a minute


@pytest.mark.slow
def test_fastest_quick_runs_end_to_end_and_replaces_its_partial_result(tmp_path):
    from benchmarks.fastest import main

    res = main(["--quick", "--out", str(tmp_path)])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and all("-fastest-cpu-quick." in n for n in names)  # the partial file is gone
    assert set(res["goals"]) == {"latency answer >= 4x the notebook's dense",
                                 "latency answer faster than the best sparsity answer",
                                 "latency search <= 3x the magnitude search's wall time"}
    assert res["latency_ms_p50"]["dense_eager_fp32_nchw"] > 0 and "dense_deploy" in res["latency_ms_p50"]
    assert res["candidates"] and all("passed" in c for c in res["candidates"])


def test_deploy_speed_flags_a_loaded_machine_by_load_and_on_the_cpu_by_cores_used():
    from benchmarks.deploy_speed import _busy

    idle = {"load_avg_start": (0.6, 0, 0), "load_avg_end": (0.7, 0, 0), "threads": 16, "cores_used": 1.3}
    assert _busy(dict(idle, device="cpu"))  # 16 threads asked for, 1.3 cores got: starved
    assert not _busy(dict(idle, device="cuda"))  # one thread drives the GPU: the norm there
    assert _busy(dict(idle, device="cuda", load_avg_end=(20.0, 0, 0)))
    assert not _busy(dict(idle, device="cpu", cores_used=15.0))


@pytest.mark.slow
def test_step_overhead_quick_times_both_loops_in_turns(tmp_path):
    from benchmarks.step_overhead import main

    res = main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{res['date']}-step-overhead-cpu-quick.{ext}" for ext in ("json", "md"))
    assert len(res["plain_ms"]) == len(res["prunelab_ms"]) == 1
    assert res["plain_ms_median"] > 0 and res["prunelab_ms_median"] > 0
    assert res["overhead_ms"] == pytest.approx(res["prunelab_ms_median"] - res["plain_ms_median"])


def test_worthy_unfolds_a_folded_classifier_exactly(tmp_path):
    """The shared model stores classifier.0 folded (4096 x 512); unfolded, VGG16 gives the same
    logits on 32x32 inputs as the folded weights applied to the pooled features' channel sums."""
    from benchmarks.worthy import unfold
    from prunelab.models import build_classifier

    net = build_classifier("vgg16", None, 10).eval()
    sd = net.state_dict()
    folded = dict(sd)
    w = torch.randn(4096, 512) * 0.05
    folded["classifier.0.weight"] = w
    torch.save(folded, tmp_path / "folded.pt")
    out = unfold(str(tmp_path / "folded.pt"), tmp_path / "dense.pt")
    unfolded = torch.load(out, weights_only=True)
    assert unfolded["classifier.0.weight"].shape == (4096, 25088)
    net.load_state_dict(unfolded)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = net.features(x).flatten(1)  # 512 channels at 1x1
        expected = net.classifier[1:](feats @ w.T + unfolded["classifier.0.bias"])
        torch.testing.assert_close(net(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_worthy_quick_runs_every_step_and_copies_each_schedules_report(tmp_path):
    from benchmarks.worthy import main

    res = main(["--quick", "--out", str(tmp_path), "--schedules", "oneshot", "iterative"])
    assert set(res["schedules"]) == {"oneshot", "iterative"}
    for schedule in ("oneshot", "iterative"):
        folder = tmp_path / res["tag"] / schedule
        assert {"report.json", "report.md"} <= {p.name for p in folder.iterdir()}
        assert any(p.suffix == ".png" for p in folder.iterdir())
    assert set(res["comparison_by_batch"]) == {"8", "1"}
    assert "dense_eager_fp32_nchw" in res["comparison_by_batch"]["8"]["latency_ms_p50"]
    assert (tmp_path / f"{res['tag']}.json").is_file() and (tmp_path / f"{res['tag']}.md").is_file()
    chosen = res["schedules"]["iterative"]["chosen"]
    if chosen:  # the recovered answer, loaded from the model its run saved, timed with the others
        assert res["comparison_by_batch"]["8"]["answers"]["iterative_search"] == [chosen["method"], chosen["ratio"]]


def test_worthy_judges_the_fastest_answer_of_any_schedule():
    from benchmarks.worthy import as_latency_answer, fastest_answer

    t = {"answers": {"latency_search": ("channel", 0.2), "iterative_search": ("channel", 0.4),
                     "sparsity_channel": ("channel", 0.2)},
         "speedups": {"dense_deploy": 3.0, "latency_search_deploy": 4.0, "iterative_search_deploy": 6.5,
                      "sparsity_channel_deploy": 4.0},
         "samples": {"latency_search_deploy": [1.0], "iterative_search_deploy": [0.5], "sparsity_channel_deploy": [1.0]}}
    assert fastest_answer(t["speedups"]) == "iterative_search_deploy"
    assert fastest_answer({"dense_deploy": 3.0, "sparsity_channel_deploy": 4.0}) is None
    answers, speedups, samples = as_latency_answer(t)
    assert answers["latency_search"] == ("channel", 0.4) and speedups["latency_search_deploy"] == 6.5
    assert samples["latency_search_deploy"] == [0.5] and t["answers"]["latency_search"] == ("channel", 0.2)


def test_recipe_cost_reads_a_runs_validation_accuracy_per_epoch(tmp_path):
    from benchmarks.recipe_cost import main, test_accuracy, val_curve

    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text(
        "epoch,step,train/acc,train/loss,train/loss_step,val/acc,val/loss\n"
        "0,19,,,2.3,,\n0,312,,,,0.25,2.0\n0,312,0.2,2.1,,,\n1,625,,,,0.5,1.5\n")
    assert val_curve(tmp_path) == [{"epoch": 1, "val_acc": 25.0}, {"epoch": 2, "val_acc": 50.0}]
    with pytest.raises(SystemExit, match="no csv/metrics.csv"):
        val_curve(tmp_path / "elsewhere")
    assert test_accuracy(tmp_path) is None  # not finished
    (tmp_path / "csv" / "metrics.csv").write_text(
        "epoch,step,train/acc,train/loss,train/loss_step,val/acc,val/loss,test/acc,test/loss\n"
        "0,312,,,,0.25,2.0,,\n1,625,,,,0.5,1.5,,\n1,625,,,,,,0.875,0.4\n")
    assert test_accuracy(tmp_path) == pytest.approx(87.5)
    res = main(["--rounds", "0", "--run", str(tmp_path), "--label", "t", "--out", str(tmp_path / "out")])
    assert "speeds" not in res and res["test_acc"] == pytest.approx(87.5)
    md = next((tmp_path / "out").glob("*-recipe-cost-cpu-t.md")).read_text()
    assert "| 2     | 50.00     |" in md and "Test accuracy at the end: 87.50%." in md
    with pytest.raises(SystemExit):
        main(["--rounds", "0"])  # nothing to read and nothing to time


def test_recipe_cost_joins_a_resumed_runs_folders_and_takes_its_reports_test_accuracy(tmp_path):
    import json

    from benchmarks.recipe_cost import main, test_accuracy

    first, resumed = tmp_path / "a", tmp_path / "b"
    for d in (first, resumed):
        (d / "csv").mkdir(parents=True)
    head = "epoch,step,train/acc,train/loss,train/loss_step,val/acc,val/loss\n"
    (first / "csv" / "metrics.csv").write_text(head + "0,312,,,,0.25,2.0\n1,625,,,,0.5,1.5\n2,937,,,,0.55,1.4\n")
    # resumed from the end of epoch 2: it redoes epoch 3, which replaces the first folder's
    (resumed / "csv" / "metrics.csv").write_text(head + "2,937,,,,0.6,1.3\n3,1249,,,,0.7,1.1\n")
    (resumed / "report.json").write_text(json.dumps({"dense": {"test_acc": {"value": 68.25, "n": 10000}}}))
    assert test_accuracy(resumed) == pytest.approx(68.25)
    res = main(["--rounds", "0", "--run", str(first), str(resumed), "--out", str(tmp_path / "out")])
    assert [c["val_acc"] for c in res["val_curve"]] == pytest.approx([25.0, 50.0, 60.0, 70.0])
    assert res["test_acc"] == pytest.approx(68.25)


def test_recipe_cost_sets_each_variant_against_the_recipe(tmp_path, monkeypatch):
    """The ratios and the table come from the timed variants: the recipe's rate over each other's
    (compiled over eager, so a slower compiled step reads below 1)."""
    from benchmarks import recipe_cost

    rates = {"recipe (auto)": 120.0, "unfolded": 60.0, "float32 NCHW": 40.0, "compiled": 96.0}
    assert set(rates) == set(recipe_cost.VARIANTS)
    assert recipe_cost.VARIANTS["compiled"] == ["model.compile=true", "model.compile_mode=default"]
    fake = {k: {"precision": "bf16-mixed", "channels_last": True, "fold_classifier": k != "unfolded",
                "compile": k == "compiled", "images_per_s": r, "median_step_s": 128 / r, "rounds": 2}
            for k, r in rates.items()}
    monkeypatch.setattr(recipe_cost, "speeds_in_turns", lambda *a, **k: fake)
    res = recipe_cost.main(["--rounds", "2", "--out", str(tmp_path)])
    assert res["bf16_vs_fp32"] == pytest.approx(3.0) and res["folded_vs_unfolded"] == pytest.approx(2.0)
    assert res["compiled_vs_eager"] == pytest.approx(0.8)
    assert res["epoch_s"] == pytest.approx(40_000 / 120)
    # the budgets: 10 epochs, and however long the recipe's own config says it trains
    epochs = recipe_cost.recipe_epochs()
    assert epochs == compose_cfg(tmp_path, ["+experiment=scratch"]).trainer.max_epochs
    assert res["budget_h"][str(epochs)] == pytest.approx(epochs * 40_000 / 120 / 3600)
    md = next(tmp_path.glob("*-recipe-cost-cpu.md")).read_text()
    assert f"{epochs * 40_000 / 120 / 3600:.1f} h for {epochs} epochs" in md
    assert "Compiled vs eager steps: 0.80x" in md
    assert "| compiled      | bf16-mixed | True          | True            | True    | 96.0" in md


def test_the_results_index_in_benchmarks_readme_is_what_the_result_files_give():
    from benchmarks import results_table

    assert results_table.main(["--check"]) == 0, "run: python -m benchmarks.results_table"


def test_results_index_names_benchmarks_and_counts_goals(tmp_path):
    from benchmarks.results_table import benchmark_of, goals_met, render, rows

    assert benchmark_of("deploy-call-nvidia-h200") == ("deploy-call", "nvidia-h200")
    assert benchmark_of("deploy-x86_64-cpu-2threads") == ("deploy", "x86_64-cpu-2threads")
    assert benchmark_of("cpu-2threads") == ("compare", "cpu-2threads")
    assert goals_met({"goals": {"a": {"met": True}, "b": {"met": False}, "c": True}}) == "2/3"
    assert goals_met({}) == "-"
    (tmp_path / "2026-01-02-worthy-cpu.json").write_text('{"goals": {"x": {"met": true}}}')
    (tmp_path / "2026-01-02-worthy-cpu.md").write_text("# figures")
    (tmp_path / "notes.json").write_text("{}")  # not a dated result: left out
    table = render(rows(tmp_path))
    assert "| 2026-01-02 | worthy | cpu | 1/1 | [2026-01-02-worthy-cpu.md](results/2026-01-02-worthy-cpu.md) |" in table
    assert "notes" not in table


def test_channel_ranking_benchmark_plans_each_ranking():
    from test_channel import X, tiny_vgg

    from benchmarks.channel_ranking import RANKINGS, main, plans
    from prunelab.pruning.channel import prunable_convs, rank_channels
    from prunelab.pruning.taylor import Calibration

    net = tiny_vgg()
    with torch.no_grad():  # filter 3 of the second conv computes nothing: removing it costs no loss
        net.features[3].weight[3] = 0
        net.features[3].bias[3] = 0
    y = torch.arange(len(X)) % 10
    calib = Calibration([(X, y), (X, y)])
    taylor = rank_channels(net, "taylor", normalize="none", calibration=calib)
    out = plans(net, 0.25, 1, taylor, rank_channels(net, "taylor", normalize="macs", calibration=calib))
    assert tuple(out) == RANKINGS
    assert 3 in out["taylor"]["features.3"] and 3 in out["taylor-layerwise"]["features.3"]
    sizes = {n: c.out_channels for n, c in prunable_convs(net).items()}
    for r in ("layerwise", "taylor-layerwise"):
        assert all(len(out[r][n]) == round(0.25 * k) for n, k in sizes.items())
    assert all(sum(len(v) for v in out[r].values()) == round(0.25 * sum(sizes.values())) for r in RANKINGS
               if "layerwise" not in r)
    with pytest.raises(SystemExit):
        main(["--weights", __file__, "--ratios", "0.5", "1.5"])


def test_worthy_goal_figures_read_as_numbers():
    from benchmarks.worthy import _measured

    assert _measured([6.195168762078389, 4.973721547402157]) == "6.20 against 4.97"
    assert _measured(87.7699) == "87.77"
    assert _measured(None) == "-"


def test_a_corrected_worthy_result_re_renders_with_its_notes(tmp_path):
    """A correction and the notes live in the json: rendering it again (a rerun of the md) keeps them,
    and the committed md of every corrected result is exactly that render."""
    from benchmarks.worthy import render

    corrected = [p for p in sorted((REPO / "benchmarks" / "results").glob("*-worthy-*.json"))
                 if "correction" in json.loads(p.read_text())]
    assert corrected
    for p in corrected:
        res = json.loads(p.read_text())
        md = render(res)
        assert f"## Notes\n\nCorrection: {res['correction']}\n" in md
        assert all(f"\n{n}\n" in md for n in res.get("notes", []))
        assert md.strip() == p.with_suffix(".md").read_text().strip(), p.name
    res = json.loads(corrected[0].read_text())
    res.pop("correction"), res.pop("notes", None)
    assert "## Notes" not in render(res)


def test_answers_are_rebuilt_by_the_ranking_their_run_searched_with(tmp_path):
    """A one-shot answer timed from the dense weights is the model the search judged only when it is
    cut by the run's own rule: here layerwise with the hidden units, not the default global ranking."""
    from omegaconf import OmegaConf
    from test_channel import X, tiny_vgg

    from benchmarks.fastest import rebuild, rebuild_options
    from benchmarks.worthy import rebuilt_answers
    from prunelab.compose import compose
    from prunelab.pruning.channel import ChannelPruner
    from prunelab.pruning.registry import make_pruner

    cfg = compose(["prune.scope=layerwise", "prune.linears=true"], tmp_path)
    search = {"chosen": {"method": "channel", "ratio": 0.3}, "best_ratio_by_method": {"channel": 0.3}}
    report = {"config": OmegaConf.to_container(cfg, resolve=True), "search": search}
    options = rebuild_options(report)
    assert options["scope"] == "layerwise" and options["linears"] is True
    model = tiny_vgg()
    net = rebuild(model, "channel", 0.3, options)
    searched = ChannelPruner(model, X[:1], scope="layerwise", linears=True).finish(0.3)
    widths = lambda m: [getattr(c, "out_channels", None) or c.out_features  # noqa: E731
                        for c in m.modules() if isinstance(c, nn.Conv2d | nn.Linear)]
    assert widths(net) == widths(searched)
    assert widths(make_pruner("channel", model).finish(0.3)) != widths(net)  # what the default rule cuts
    with torch.no_grad():
        assert torch.equal(net(X), searched(X))
    assert rebuilt_answers({"oneshot": {"report": report}, "iterative": {}}) == (search, options)
    # an iterative job's ratios are recovered models': nothing is rebuilt from the dense weights
    assert rebuilt_answers({"iterative": {"report": report}}) == ({"chosen": None, "best_ratio_by_method": {}}, {})
    taylor = compose(["prune.importance=taylor"], tmp_path)
    with pytest.raises(ValueError, match="calibration images"):
        rebuild_options({"config": OmegaConf.to_container(taylor, resolve=True)})
