"""The latency runtimes (prunelab.deploy): registry, resolved spec, agreement that cannot be fooled,
``auto``, and shipping the timed model in its runtime's format."""

import copy
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_channel import tiny_vgg

from prunelab.deploy import registry
from prunelab.deploy.auto import pick
from prunelab.deploy.checks import DeployMismatchError, agreement, check_agreement
from prunelab.deploy.form import Form
from prunelab.deploy.registry import Runtime
from prunelab.deploy.spec import resolve_spec
from prunelab.deploy.timing import time_dense_and_pruned
from prunelab.errors import ConfigError
from prunelab.hardware import Hardware, detect
from prunelab.pruning.channel import ChannelPruner, default_example

X = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(5))
HAS_ORT = registry.get("onnxruntime").missing() is None
HAS_OV = registry.get("openvino").missing() is None


class FakeForm(Form):
    """The reference network, run in ``dtype``, its logits passed through ``fn(logits, x)``."""

    def __init__(self, net, dtype, fn, runtime):
        super().__init__(copy.deepcopy(net).eval().to(dtype), dtype, False, torch.device("cpu"))
        self.fn, self.runtime = fn, runtime

    def forward(self, x):
        return self.fn(self.net(self.prepare(x)).float(), x)


class FakeRuntime(Runtime):
    def __init__(self, name, fn=lambda out, x: out, dtype=torch.float32):
        self.name, self.fn, self.dtype = name, fn, dtype

    def build(self, net, spec, *, device, example_batch, two_four=False, channels_last=None):
        return FakeForm(net, self.dtype, self.fn, self.name)


def scaled(k):
    return lambda out, x: out * k


def wrong_at_batch_one(out, x):
    return out.roll(1, dims=1) if x.shape[0] == 1 else out


@pytest.fixture
def fakes(monkeypatch):
    """Registers fake runtimes for one test (the registry is left as it was after)."""

    def add(name, **kw):
        monkeypatch.setitem(registry.RUNTIMES, name, __name__)
        monkeypatch.setitem(registry._loaded, name, FakeRuntime(name, **kw))
        return name

    return add


def spec_for(**latency):
    return resolve_spec({"batch_size": 4, "batch_sizes": [1, 4], "warmup": 1, "iters": 2, "auto_iters": 3,
                         **latency}, detect("cpu"))[0]


def channel_half(net):
    return ChannelPruner(net, default_example(net), round_to=4).finish(0.5).eval()


# --- names, spec, extras --------------------------------------------------------------------------


def test_runtime_names_come_from_the_registry_alone(tmp_path, fakes):
    from conftest import compose_cfg
    from prunelab import config_check

    cfg = compose_cfg(tmp_path, ["latency.runtime=bogus"])
    with pytest.raises(ConfigError, match="auto, eager, deploy, onnxruntime, openvino, inductor"):
        config_check.check_values(cfg)
    fakes("mine")  # one registration: the config check, the spec and the timing all know it
    config_check.check_values(compose_cfg(tmp_path, ["latency.runtime=mine"]))
    assert spec_for(runtime="mine").runtime == "mine"
    with pytest.raises(ConfigError, match="latency.auto_runtimes"):
        config_check.check_values(compose_cfg(tmp_path, ["latency.auto_runtimes=[deploy,bogus]"]))


def test_the_spec_is_frozen_and_resolved_once_with_the_hardware():
    bf16 = Hardware("cpu", "x", "AVX512", frozenset({"avx512f", "avx512_bf16"}))
    avx2 = Hardware("cpu", "y", "AVX2", frozenset({"avx2"}))
    s, record = resolve_spec({"runtime": "auto"}, bf16)
    assert s.dtype == torch.bfloat16 and s.channels_last and record["dtype"]["value"] == "bfloat16"
    s2, _ = resolve_spec({"runtime": "auto"}, avx2)
    assert s2.dtype == torch.float32 and s2.channels_last and not s2.fuse
    with pytest.raises(Exception, match="frozen|cannot assign"):
        s.dtype = torch.float32
    json.dumps(s.to_dict())  # the report stores it as it is


def _absent(monkeypatch, *names):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in names else real(n, *a))


def test_a_missing_extra_is_one_line_naming_it(monkeypatch, tmp_path):
    from conftest import compose_cfg
    from prunelab import config_check

    _absent(monkeypatch, "openvino")
    with pytest.raises(ConfigError) as err:
        resolve_spec({"runtime": "openvino"}, detect("cpu"))
    msg = str(err.value)
    assert "\n" not in msg and msg.endswith("pip install prunelab[openvino]") and "openvino missing" in msg
    with pytest.raises(ConfigError, match=r"prunelab\[openvino\]"):
        config_check._check_machine(compose_cfg(tmp_path, ["latency.runtime=openvino"]))
    _absent(monkeypatch, "onnxruntime", "openvino")
    with pytest.raises(ConfigError, match=r"pip install prunelab\[onnx\]"):
        resolve_spec({"runtime": "onnxruntime"}, detect("cpu"))
    resolve_spec({"runtime": "auto"}, detect("cpu"))  # auto skips what is missing instead


# --- agreement that cannot be fooled --------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "k"), [(torch.float32, 1.01), (torch.bfloat16, 1.05)])
def test_a_form_that_scales_logits_keeps_top1_and_is_still_refused(dtype, k):
    net = tiny_vgg().eval()
    res = agreement(net, FakeForm(net, dtype, scaled(k), "scaled"), [X], "cpu")
    assert res["agreement"] == 1.0 and res["flips"] == 0  # the top-1 check alone would pass it
    assert res["logit_scale"] == pytest.approx(k, rel=5e-3)
    with pytest.raises(DeployMismatchError, match="not its logits"):
        check_agreement(res)


def test_bf16_rounding_is_not_refused():
    net = tiny_vgg().eval()
    res = check_agreement(agreement(net, FakeForm(net, torch.bfloat16, lambda o, x: o, "bf16"), [X], "cpu"))
    assert 0 < res["rms_rel_logit_error"] < 3e-2 and abs(res["logit_scale"] - 1) < 1e-2


def test_a_form_wrong_at_batch_one_only_is_refused_at_that_size(fakes):
    net = tiny_vgg().eval()
    spec = spec_for(runtime=fakes("one_off", fn=wrong_at_batch_one))
    batches = {1: X[:1], 4: X[:4]}
    with pytest.raises(DeployMismatchError, match="at batch size 1"):
        time_dense_and_pruned(net, None, None, batches, "cpu", spec, agreement_batches=[X])
    spec = spec_for(runtime=fakes("honest"))
    res = time_dense_and_pruned(net, None, None, batches, "cpu", spec, agreement_batches=[X])
    assert set(res["agreement"]["dense"]["by_batch_size"]) == {"1", "4"}
    assert res["agreement"]["dense"]["by_batch_size"]["1"]["images"] == 8  # 8 forwards of one image


# --- auto -----------------------------------------------------------------------------------------


def test_auto_times_every_usable_runtime_in_turns_and_picks_the_fastest(fakes, monkeypatch):
    from prunelab.deploy import auto

    fast, slow, bad = fakes("fast"), fakes("slow"), fakes("liar", fn=scaled(2.0))
    ms = {"fast": 1.0, "slow": 3.0, "liar": 0.1}
    seen = {}

    def fake_timer(models, batch, device, warmup, iters, transfer, precision, rotate=False):
        seen.update(models=list(models), rotate=rotate, iters=iters, shape=tuple(batch.shape))
        return {name: [ms[name]] * iters for name in models}

    monkeypatch.setattr(auto, "time_interleaved", fake_timer)
    _absent(monkeypatch, "openvino")
    spec = spec_for(runtime="auto", auto_runtimes=[slow, fast, bad, "openvino"])
    chosen, record = pick(tiny_vgg().eval(), X[:4], spec, "cpu", X)
    assert chosen.runtime == "fast" and spec.runtime == "auto"  # a new frozen spec
    assert seen == {"models": ["slow", "fast"], "rotate": True, "iters": 3, "shape": (4, 3, 32, 32)}
    assert list(record["figures"]) == ["fast", "slow"] and record["figures"]["slow"]["p50_ms"] == 3.0
    assert "liar" in record["refused"] and "not its logits" in record["refused"]["liar"]
    assert "prunelab[openvino]" in record["skipped"]["openvino"]
    assert "fast" in record["why"] and "3.00x" in record["why"]
    from prunelab.report.runtimes import choice_section

    md = "\n".join(choice_section({"runtime_choice": record}))
    assert "chose **fast**" in md and "| **fast** | 1.00 |" in md and "liar" in md


def test_auto_with_nothing_usable_says_what_to_do(fakes):
    spec = spec_for(runtime="auto", auto_runtimes=[fakes("liar", fn=scaled(3.0))])
    with pytest.raises(ConfigError, match="set latency.runtime"):
        pick(tiny_vgg().eval(), X[:4], spec, "cpu")


# --- the library runtimes, for real ---------------------------------------------------------------


def _run_snippet(load: str, images: np.ndarray, cwd: Path, monkeypatch) -> torch.Tensor:
    monkeypatch.chdir(cwd)
    ns = {"images": images}
    exec(load, ns)
    return torch.as_tensor(np.asarray(ns["logits"]))


@pytest.mark.parametrize("name", [pytest.param("onnxruntime", marks=pytest.mark.skipif(not HAS_ORT, reason="no onnx extra")),
                                  pytest.param("openvino", marks=pytest.mark.skipif(not HAS_OV, reason="no openvino extra"))])
def test_onnx_based_runtimes_agree_at_every_size_and_ship_a_file_that_loads(name, tmp_path, monkeypatch):
    dense = tiny_vgg().eval()
    pruned = channel_half(dense)
    spec = spec_for(runtime=name)
    res = time_dense_and_pruned(dense, pruned, "channel", {1: X[:1], 4: X[:4]}, "cpu", spec,
                                agreement_batches=[X], ship_to=tmp_path / "models")
    assert res["runtime"]["runtime"] == name and res["runtime"]["folded"] == {"dense": True, "pruned": True}
    assert all(set(a["by_batch_size"]) == {"1", "4"} for a in res["agreement"].values())
    shipped = res["shipped"]
    assert shipped["runtime"] == name and Path(shipped["file"]).is_file() and shipped["bytes"] > 0
    assert shipped["format"] == ("onnx" if name == "onnxruntime" else "xml")
    want = pruned(X).detach()
    got = _run_snippet(shipped["load"], X.numpy(), tmp_path, monkeypatch)
    tol = 1e-4 if spec.dtype == torch.float32 or name == "onnxruntime" else 5e-2
    assert torch.allclose(got, want, atol=tol * want.abs().max().item()), (got - want).abs().max()
    if name == "openvino":
        desc = res["runtime"]["spec"]
        assert desc["runtime"] == "openvino"
        want_hint = "bf16" if detect("cpu").native_bf16 else "f32"
        assert f"'INFERENCE_PRECISION_HINT': '{want_hint}'" in shipped["load"]
    md = "\n".join(__import__("prunelab.report.runtimes", fromlist=["x"]).shipped_section({"latency": res}))
    assert "## Serving it" in md and shipped["load"] in md


@pytest.mark.skipif(not HAS_OV, reason="no openvino extra")
def test_openvino_runs_in_the_precision_the_spec_resolved():
    from prunelab.deploy.onnxrt import OnnxFile
    from prunelab.deploy.openvino import OpenVinoForm

    net = tiny_vgg().eval()
    exported = OnnxFile(net, X[:2])
    for dtype, hint in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
        form = OpenVinoForm(exported, dtype, False)
        form.warm(X[:2])
        assert form.describe()["inference_precision"] == hint


@pytest.mark.slow
def test_inductor_frozen_form_agrees_at_every_size():
    from prunelab.deploy.checks import check_every_size

    net = tiny_vgg().eval()
    spec = spec_for(runtime="inductor")
    form = registry.get("inductor").build(net, spec, device=torch.device("cpu"), example_batch=X[:4])
    res = check_every_size(net, form, X, {1: X[:1], 4: X[:4]}, "cpu", what="inductor")
    assert set(res) == {1, 4} and form.describe()["frozen"] and form.describe()["compile_s"] > 0


@pytest.mark.slow  # ~6 min on a loaded 2-core CPU: every candidate's ONNX export
@pytest.mark.skipif(not HAS_ORT, reason="no onnx extra")
def test_a_latency_search_with_auto_ships_the_chosen_model_in_its_format(tmp_path, monkeypatch):
    """End to end: auto picks (ONNX Runtime made the fastest here), every candidate is timed there,
    and the chosen model is written as ONNX beside its state_dict, with report.md's lines to load it."""
    from conftest import FAST_LEARNER, compose_cfg
    from prunelab.deploy import auto
    from prunelab.pipeline import run

    real = auto.time_interleaved

    def ort_wins(models, batch, *a, **kw):
        samples = real(models, batch, *a, **kw)
        return {k: [t * (0.01 if k == "onnxruntime" else 1.0) for t in v] for k, v in samples.items()}

    monkeypatch.setattr(auto, "time_interleaved", ort_wins)
    cfg = compose_cfg(tmp_path, [*FAST_LEARNER, "model=vgg16", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                                 "search.objective=latency", "search.methods=[channel]", "search.grid=[0.5]",
                                 "search.refine_step=null", "search.tolerance=100", "latency.iters=2",
                                 "latency.runtime=auto", "latency.auto_runtimes=[deploy,onnxruntime]",
                                 "latency.agreement_images=32", "prune.round_to=16"])
    report = run(cfg)
    choice = report["runtime_choice"]
    assert choice["chosen"] == "onnxruntime" and set(choice["figures"]) == {"deploy", "onnxruntime"}
    assert report["latency"]["runtime"]["runtime"] == "onnxruntime"
    assert report["search"]["final_round"]["runtime"]["runtime"] == "onnxruntime" \
        if report["search"].get("final_round") else True
    out = Path(cfg.paths.output_dir)
    assert (out / "models" / "pruned.onnx").is_file() and (out / "models" / "pruned_channels.json").is_file()
    md = (out / "report.md").read_text()
    assert "chose **onnxruntime**" in md and "ort.InferenceSession('models/pruned.onnx'" in md
    from prunelab.pruning.channel_files import load_channel_pruned

    net = load_channel_pruned(out / "models").eval()
    x = torch.randn(2, 3, 32, 32)
    got = _run_snippet(report["latency"]["shipped"]["load"], x.numpy(), out, monkeypatch)
    assert torch.allclose(got, net(x).detach(), atol=1e-3)


# --- the benchmark --------------------------------------------------------------------------------


def _fake_result():
    cols = ["eager fp32", "deploy fp32", "onnxruntime fp32", "openvino f32", "openvino bf16"]
    ms = {"eager fp32": 100.0, "deploy fp32": 40.0, "onnxruntime fp32": 45.0, "openvino f32": 60.0,
          "openvino bf16": 20.0}
    timings = {str(b): {"iters": 3, "p50_ms": {f"{m}/{c}": {"p50": v / (100 if b == 1 else 1), "p90": v}
                                               for m in ("dense", "channel 0.5") for c, v in ms.items()}}
               for b in (1, 128)}
    return {"date": "d", "machine": {"cpu": "cpu", "threads": 2, "flags": ["avx2"], "native_bf16": False,
                                     "load_avg_start": [4.0], "load_avg_end": [4.0], "note": "busy"},
            "versions": {"torch": "x"}, "models": ["dense", "channel 0.5"], "batch_sizes": [1, 128], "columns": cols,
            "skipped": {"inductor bf16": "no compiler"}, "refused": {}, "agreement": {"a": {"1": {"rms_rel_logit_error": 0.001}}},
            "timings": timings, "wall_s": 1.0}


def test_runtimes_benchmark_goals_and_table():
    from benchmarks.runtimes import goals, render

    res = _fake_result()
    assert goals(res["timings"], 128, 1) == {}  # no deploy bf16 column: nothing to compare with
    for t in res["timings"].values():
        for m in ("dense", "channel 0.5"):
            t["p50_ms"][f"{m}/deploy bf16"] = {"p50": t["p50_ms"][f"{m}/deploy fp32"]["p50"] * 0.75, "p90": 0.0}
    res["goals"] = g = goals(res["timings"], 128, 1)
    # auto's pick is OpenVINO bf16 (20 ms) against the deploy form's 30 ms: 1.5x, met; channel 0.5 runs as fast
    # as dense in the fake (1x, not met); batch 1 dense 0.2 ms (met)
    assert {k: v["runtime"] for k, v in g.items()} == dict.fromkeys(g, "openvino bf16")
    assert g["vs_deploy_large"]["value"] == pytest.approx(1.5) and g["vs_deploy_large"]["met"]
    assert not g["channel_vs_dense_large"]["met"] and g["dense_batch1_ms"]["met"]
    res["columns"].append("deploy bf16")
    md = render(res)
    assert "| dense, 128 | 100.0 | 40.0 | 45.0 | 60.0 | **20.0** |" in md
    assert "a loaded machine" in md and "inductor bf16: no compiler" in md and "busy" in md


@pytest.mark.slow
def test_runtimes_benchmark_quick(tmp_path):
    from benchmarks.runtimes import main

    res = main(["--quick", "--out", str(tmp_path)])
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".md"]
    assert res["quick"] and res["batch_sizes"] == [1, 4] and not res["refused"]
    timed = {k.split("/")[1] for k in res["timings"]["4"]["p50_ms"]}
    assert timed | set(res["skipped"]) == set(res["columns"])
    assert all(set(a) == {"1", "4"} for a in res["agreement"].values())  # every form checked at both sizes


def test_runtimes_benchmark_times_on_a_gpu_what_auto_weighs_there():
    from benchmarks.runtimes import columns_for, result_machine

    gpu, cpu = columns_for(torch.device("cuda")), columns_for(torch.device("cpu"))
    assert not any(name == "openvino" for name, _ in gpu.values())  # CPU-only: listed as left out, not a column
    assert {name for name, _ in gpu.values()} == {"eager", "deploy", "inductor", "onnxruntime"}
    assert {name for name, _ in cpu.values()} == {"eager", "deploy", "onnxruntime", "openvino", "inductor"}
    assert result_machine({"gpu": "NVIDIA H100 80GB HBM3", "threads": 16}) == "nvidia-h100-80gb-hbm3"
    assert result_machine({"cpu": "AMD EPYC", "threads": 2}).endswith("-cpu-2threads")
