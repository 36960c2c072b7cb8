"""The deploy runtime (prunelab.runtime) and dense-vs-pruned timing in turns (prunelab.deploy)."""

import copy

import pytest
import torch
from omegaconf import OmegaConf
from test_channel import tiny_vgg
from torch import nn

import prunelab
from prunelab.deploy import (
    Deployed,
    DeployMismatchError,
    agreement,
    check_agreement,
    deploy_form,
    eager_form,
)
from prunelab.deploy.timing import MAGNITUDE_NOTE, time_dense_and_pruned
from prunelab.errors import ConfigError, PrunelabError
from prunelab.models.rewrite import ConvReLU, fuse_conv_relu
from prunelab.pruning.semi_structured import SemiStructuredPruner, two_four_mask

X = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
CUDA = torch.cuda.is_available()


def lat_cfg(**kw):
    return {"runtime": "deploy", "batch_size": 4, "batch_sizes": [1, 4], "warmup": 1, "iters": 3, **kw}


def snapshot(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_fp32_deploy_equals_eager_and_leaves_the_original_alone():
    net = tiny_vgg().train()
    before = snapshot(net)
    form = deploy_form(net, dtype=torch.float32, channels_last=True, device="cpu", example_batch=X[:2])
    with torch.no_grad():
        ref = net.eval()(X)
        net.train()
        out = form(X)
    assert torch.allclose(out, ref, atol=1e-4), (out - ref).abs().max()
    d = form.describe()
    assert d["runtime"] == "deploy" and d["folded"] and d["layout"] == "channels_last" and d["dtype"] == "float32"
    assert d["graph"] is False and d["compile"] is False  # no CUDA here
    # the caller's network: same values, NCHW weights, pool still there, still training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert net.features[0].weight.is_contiguous() and isinstance(net.avgpool, nn.AdaptiveAvgPool2d)
    assert net.training and all(m.training for m in net.modules())
    assert not any(p.requires_grad is False for p in net.parameters())
    assert form.net.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not form.net.training


def test_bf16_deploy_keeps_the_answers():
    net = tiny_vgg()
    form = deploy_form(net, dtype=torch.bfloat16, device="cpu")
    assert form.net.classifier[0].weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert form(X).dtype == torch.bfloat16  # weights cast, no autocast
    res = check_agreement(agreement(net, form, [X, (X[:3], None)], "cpu"))
    assert res["images"] == 9 and res["agreement_beyond_rounding"] >= 0.99 and res["nonfinite"] == 0
    assert res["dtype"] == "bfloat16" and res["max_rel_logit_diff"] < res["rounding_rtol"]


def test_fold_only_where_exact_and_the_skip_is_recorded():
    net = tiny_vgg()
    big = torch.randn(2, 3, 64, 64)  # features end at 32x2x2: the pool averages, folding would be wrong
    form = deploy_form(net, device="cpu", example_batch=big)
    assert not form.describe()["folded"] and "pool not folded" in form.describe()["notes"][0]
    with torch.no_grad():
        assert torch.allclose(form(big), net(big), atol=1e-5)
    folded = deploy_form(net, device="cpu")  # 32x32 by default: folded, and only for 32x32
    with pytest.raises(ValueError, match="folded VGG's pool for 32x32"):
        folded(big)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    assert "needs a VGG-like model" in deploy_form(mlp, device="cpu").notes[0]
    assert "fold=False" in deploy_form(net, fold=False, device="cpu").notes[0]


def test_agreement_catches_a_broken_form():
    net = tiny_vgg()
    form = deploy_form(net, device="cpu")
    assert check_agreement(agreement(net, form, [X], "cpu"))["agreement"] == 1.0
    with torch.no_grad():
        form.net.classifier[-1].weight.neg_()
        form.net.classifier[-1].bias.neg_()
    res = agreement(net, form, [X], "cpu")
    assert res["flips_beyond_rounding"] == res["flips"] > 0 and res["max_rel_logit_diff"] > 1
    with pytest.raises(DeployMismatchError, match="changes top-1 answers beyond rounding") as err:
        check_agreement(res, what="pruned deploy form")
    assert isinstance(err.value, PrunelabError) and "pruned deploy form (float32)" in str(err.value)
    # inf/NaN logits fail whatever the agreement
    with pytest.raises(DeployMismatchError, match="inf/NaN"):
        check_agreement(dict(res, agreement_beyond_rounding=1.0, nonfinite=1))


def test_eager_form_is_the_model_as_trained_under_autocast():
    net = tiny_vgg()
    form = eager_form(net, "bf16-mixed", channels_last=True)
    assert form.net is net and form.describe()["runtime"] == "eager"
    with torch.no_grad():
        assert form(X).dtype == torch.bfloat16
        assert eager_form(net, "32-true")(X).dtype == torch.float32


CALLS: list[str] = []


class Tagged(nn.Module):
    """Writes its tag to CALLS on every forward; deploy copies keep the tag (CALLS is global)."""

    def __init__(self, tag, seed=0):
        super().__init__()
        self.tag = tag
        self.lin = nn.Linear(3 * 8 * 8, 10)
        torch.manual_seed(seed)
        nn.init.normal_(self.lin.weight)

    def forward(self, x):
        CALLS.append(self.tag)
        return self.lin(x.flatten(1))


class Recorder:
    def __init__(self):
        self.metrics = {}

    def log_metrics(self, metrics, step):
        self.metrics.update(metrics)


@pytest.mark.parametrize("runtime", ["deploy", "eager"])
@pytest.mark.parametrize("method", ["magnitude", "channel", "semi_structured"])
def test_dense_and_pruned_take_turns_for_every_method(method, runtime):
    batches = {1: torch.randn(1, 3, 8, 8), 4: torch.randn(4, 3, 8, 8)}
    CALLS.clear()
    rec = Recorder()
    res = time_dense_and_pruned(Tagged("d"), Tagged("p", seed=1), method, batches, "cpu", lat_cfg(runtime=runtime),
                                [rec], check=False)
    w, n = 1, 3
    timed = (["d"] * w + ["p"] * w + ["d", "p"] * n) * 2  # per batch size: warm-up, then turns
    # every form runs every batch size once, untimed (and deploy its example batch first)
    untimed = ["d", "p", "d", "p", "d", "p"] if runtime == "deploy" else ["d", "p", "d", "p"]
    assert CALLS == untimed + timed
    assert res["runtime"]["runtime"] == runtime and res["runtime"]["batch_sizes"] == [1, 4]
    assert res["batch_size"] == 4 and set(res["by_batch_size"]) == {"1", "4"}
    assert res["dense"]["iters"] == n and res["dense"]["interleaved_with"] == ["pruned"]
    assert res["speedup_p50"] == pytest.approx(res["dense"]["p50"] / res["pruned"]["p50"])
    lo, hi = res["speedup_paired_5_95"]
    assert lo <= res["by_batch_size"]["4"]["paired_ratio"]["p50"] <= hi
    assert {"latency/dense/p50_ms", "latency/pruned/p99_ms", "latency/dense/bs1/p50_ms",
            "latency/speedup_p50"} <= set(rec.metrics)
    if method == "magnitude":
        assert res["notes"][0].startswith(MAGNITUDE_NOTE) and res["speedup_beyond_noise"] is False
        noise = res["noise"]
        assert noise["ratio_of_p50s"] == res["speedup_p50"] and len(noise["paired_ratio_5_95"]) == 2
        assert noise["within_noise"] == (noise["paired_ratio_5_95"][0] <= 1 <= noise["paired_ratio_5_95"][1])
    else:
        assert "noise" not in res
    if method == "semi_structured":
        assert "masked-dense" in res["kernels"] and res["notes"][0] == res["kernels"]
    else:
        assert res["kernels"] is None


def test_two_four_on_cpu_is_masked_dense_and_checked():
    dense = tiny_vgg()
    pruned = SemiStructuredPruner(copy.deepcopy(dense)).finish(0.3)
    res = time_dense_and_pruned(dense, pruned, "semi_structured", {4: X[:4]}, "cpu",
                                lat_cfg(batch_sizes=[4], dtype="float32"))
    assert "no CUDA device" in res["kernels"] and "masked-dense" in res["kernels"]
    assert res["runtime"]["dtype"] == "float32" and res["runtime"]["folded"] == {"dense": True, "pruned": True}
    assert res["agreement"]["pruned"]["agreement"] == 1.0 and res["agreement"]["dense"]["images"] == 4


@pytest.mark.parametrize("requested", [True, False])
def test_deploy_layout_follows_latency_channels_last(requested):
    res = time_dense_and_pruned(tiny_vgg(), None, None, {4: X[:4]}, "cpu",
                                lat_cfg(batch_sizes=[4], dtype="float32", channels_last=requested))
    assert res["runtime"]["layout"] == ("channels_last" if requested else "contiguous")
    assert res["agreement"]["dense"]["agreement"] == 1.0
    # the eager runtime times the model as trained: NCHW unless the caller says otherwise
    res = time_dense_and_pruned(tiny_vgg(), None, None, {4: X[:4]}, "cpu",
                                lat_cfg(batch_sizes=[4], runtime="eager", channels_last=requested))
    assert res["runtime"]["layout"] == "contiguous"


def test_agreement_is_checked_on_the_batches_given():
    dense = tiny_vgg()
    pruned = SemiStructuredPruner(copy.deepcopy(dense)).finish(0.3)
    check = [X[:3], X[3:], X[:3]]  # 9 images: checked as two batches of 4 (the timed shape), one left out
    res = time_dense_and_pruned(dense, pruned, "semi_structured", {4: X[:4]}, "cpu",
                                lat_cfg(batch_sizes=[4], dtype="float32"), agreement_batches=check)
    assert {tag: a["images"] for tag, a in res["agreement"].items()} == {"dense": 8, "pruned": 8}
    res = time_dense_and_pruned(dense, pruned, "semi_structured", {4: X[:4]}, "cpu",
                                lat_cfg(batch_sizes=[4], dtype="float32"), agreement_batches=[X[:3]])
    assert res["agreement"]["dense"]["images"] == 4  # fewer than one batch: the timing batch


def test_dense_alone_when_nothing_was_pruned():
    rec = Recorder()
    res = time_dense_and_pruned(tiny_vgg(), None, None, {4: X[:4]}, "cpu", lat_cfg(batch_sizes=[4]), [rec])
    assert res["pruned"] is None and "speedup_p50" not in res and res["dense"]["interleaved_with"] == []
    assert res["agreement"]["dense"]["agreement"] == 1.0 and res["runtime"]["folded"] == {"dense": True}
    assert set(rec.metrics) == {"latency/dense/p50_ms", "latency/dense/p90_ms", "latency/dense/p99_ms"}


def test_refuses_a_model_pruned_in_place_and_a_missing_headline_batch():
    net = Tagged("d")
    with pytest.raises(ValueError, match="same module"):
        time_dense_and_pruned(net, net, "magnitude", {4: torch.randn(4, 3, 8, 8)}, "cpu", lat_cfg())
    with pytest.raises(ValueError, match="latency.batch_size=4"):
        time_dense_and_pruned(net, Tagged("p"), "channel", {1: torch.randn(1, 3, 8, 8)}, "cpu", lat_cfg())


def test_a_partial_config_takes_the_yaml_defaults():
    from prunelab.deploy.spec import resolve_spec
    from prunelab.hardware import Hardware

    conf = OmegaConf.load(prunelab.__path__[0] + "/conf/latency/default.yaml")
    spec, _ = resolve_spec({"iters": 7}, Hardware("cpu", "x"))
    assert spec.iters == 7 and spec.warmup == conf.warmup and spec.runtime == conf.runtime
    assert spec.batch_size == conf.batch_size and list(spec.batch_sizes) == sorted({*conf.batch_sizes, conf.batch_size})
    assert list(spec.auto_runtimes) == list(conf.auto_runtimes) and spec.auto_iters == conf.auto_iters


@pytest.mark.slow
def test_compiled_form_agrees_and_reports_its_compile_time():
    net = tiny_vgg()
    form = deploy_form(net, compile=True, device="cpu", example_batch=X[:4])
    check_agreement(agreement(net, form, [X[:4]], "cpu"))
    d = form.describe()
    assert d["compile"] and d["compile_s"] > 0 and not d["graph"] and form.batch_sizes == [4]


# --- CUDA ------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_graph_form_equals_eager_per_batch_size():
    net = tiny_vgg().cuda()
    autotune_before = torch.backends.cudnn.benchmark
    form = deploy_form(net, dtype=torch.float32, channels_last=True, device="cuda", example_batch=X[:4])
    assert isinstance(form, Deployed) and form.use_graph and form.batch_size == 4
    x = X.cuda()
    with torch.inference_mode():
        ref = net(x)
        out4, out6 = form(x[:4]), form(x)  # a second shape: a second graph
        again = form(x[:4])
    assert form.batch_sizes == [4, 6] and form.describe()["graph"] and form.describe()["cudnn_autotune"]
    assert torch.backends.cudnn.benchmark == autotune_before  # autotuned inside the capture only
    for got, want in ((out4, ref[:4]), (out6, ref), (again, ref[:4])):
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-3), (got - want).abs().max()
    assert check_agreement(agreement(net, form, [x], "cuda"))["agreement"] == 1.0


@pytest.mark.gpu
def test_cuda_graph_casts_any_batch_in_its_input_copy():
    # The served path hands the batch straight to the graph's buffer: its copy casts device, dtype
    # and layout, so a batch from the host, in fp64 or in either layout, gets the same answers.
    net = tiny_vgg().cuda().eval()
    form = deploy_form(net, dtype=torch.bfloat16, channels_last=True, device="cuda", example_batch=X[:4])

    def same_net_eager(x):  # the form's own (bf16, NHWC, fused) network, run without the graph
        return form.net(x.cuda().to(dtype=torch.bfloat16, memory_format=torch.channels_last)).float()

    tol = 2e-3  # rounding between cuDNN's algorithms; stale or miscast inputs differ far more (checked below)
    with torch.inference_mode():
        first, second = same_net_eager(X[:4]), same_net_eager(X[2:6])
        assert (first - second).abs().max() > 20 * tol
        for x in (X[:4], X[:4].double(), X[:4].cuda(), X[:4].cuda().to(memory_format=torch.channels_last)):
            got = form(x)
            assert got.dtype == torch.bfloat16 and torch.allclose(got.float(), first, rtol=0, atol=tol)
        other = form(X[2:6])  # the next batch replaces the last one in the buffer
        assert torch.allclose(other.float(), second, rtol=0, atol=tol)
        assert (form(X[:4]).argmax(1) == net(X[:4].cuda()).argmax(1)).all()
    assert form.batch_sizes == [4]


def test_fuse_conv_relu_fuses_each_pair_in_a_copy():
    net = tiny_vgg().eval()
    before = snapshot(net)
    fused = fuse_conv_relu(net)
    feats = list(net.features)
    pairs = sum(isinstance(a, nn.Conv2d) and isinstance(b, nn.ReLU) for a, b in zip(feats, feats[1:], strict=False))
    assert pairs == 5 and sum(isinstance(m, ConvReLU) for m in fused.modules()) == pairs
    assert not any(isinstance(m, nn.ReLU) for m in fused.features)  # each ReLU went into its conv
    assert not any(isinstance(m, ConvReLU) for m in net.modules())  # the original is untouched
    assert all(torch.equal(v, snapshot(net)[k]) for k, v in before.items())
    assert len(fused.features) == len(net.features) and isinstance(fused.classifier[1], nn.ReLU)


def test_fuse_is_refused_off_cuda_and_auto_leaves_cpu_forms_unfused():
    net = tiny_vgg()
    with pytest.raises(ValueError, match="needs a CUDA device"):
        deploy_form(net, fuse=True)
    with pytest.raises(ValueError, match="fuse=True with compile=True"):
        deploy_form(net, fuse=True, compile=True)
    assert deploy_form(net).describe()["fused_conv_relu"] == 0
    with pytest.raises(ConfigError, match="latency.fuse=auto or latency.fuse=false"):
        time_dense_and_pruned(net, None, None, {4: X[:4]}, "cpu", lat_cfg(fuse=True, batch_size=4, batch_sizes=[4]),
                              [], check=False)


@pytest.mark.gpu
@pytest.mark.parametrize("compile_", [False, True])
def test_cuda_deploy_fuses_conv_relu_by_default_unless_compiled(compile_):
    net = tiny_vgg().cuda().eval()
    form = deploy_form(net, dtype=torch.float32, device="cuda", compile=compile_, example_batch=X[:4])
    assert form.fused == (0 if compile_ else 5) == form.describe()["fused_conv_relu"]
    with torch.inference_mode():
        got, want = form(X[:4]), net(X[:4].cuda())
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-3), (got - want).abs().max()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_conv_relu_computes_the_same_on_cuda(dtype):
    net = tiny_vgg().cuda().to(dtype=dtype, memory_format=torch.channels_last).eval()
    x = X.cuda().to(dtype=dtype, memory_format=torch.channels_last)
    with torch.inference_mode():
        want, got = net(x).float(), fuse_conv_relu(net)(x).float()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert torch.allclose(got, want, rtol=tol, atol=tol), (got - want).abs().max()


def test_cudnn_autotune_is_restored_even_when_the_block_raises():
    from prunelab.deploy.native import _cudnn_autotune

    before = torch.backends.cudnn.benchmark
    with pytest.raises(RuntimeError), _cudnn_autotune():
        assert torch.backends.cudnn.benchmark is True
        raise RuntimeError("capture failed")
    assert torch.backends.cudnn.benchmark == before


def _two_four_mlp():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                        nn.Linear(256, 10))
    with torch.no_grad():
        for i in (1, 3):
            net[i].weight.mul_(two_four_mask(net[i].weight))
    return net.cuda().eval()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_two_four_sparse_kernels_run_in_half_precision(dtype):
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("2:4 kernels need compute capability >= 8.0")
    pruned = _two_four_mlp()
    dense = copy.deepcopy(pruned)
    form = deploy_form(pruned, dtype=getattr(torch, dtype), device="cuda", two_four=True, example_batch=X[:4])
    assert form.sparse and "2:4 kernels" in form.kernels
    assert pruned[1].weight.dtype == torch.float32 and pruned[1].weight.layout == torch.strided  # untouched
    check_agreement(agreement(pruned, form, [X[:4]], "cuda"))
    res = time_dense_and_pruned(dense, pruned, "semi_structured", {4: X[:4]}, "cuda",
                                lat_cfg(batch_sizes=[4], dtype=dtype))
    assert res["runtime"]["dtype"] == dtype and "2:4 kernels" in res["kernels"]
    assert res["agreement"]["pruned"]["nonfinite"] == 0


@pytest.mark.gpu
def test_two_four_in_fp32_says_masked_dense():
    pruned = _two_four_mlp()
    form = deploy_form(pruned, dtype=torch.float32, device="cuda", two_four=True)
    assert not form.sparse and "take only float16/bfloat16" in form.kernels


@pytest.mark.slow
def test_deploy_speed_benchmark_quick(tmp_path):
    from benchmarks.deploy_speed import main

    res = main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    files = sorted(p.suffix for p in tmp_path.iterdir())
    assert files == [".json", ".md"] and res["quick"] and res["headline_batch_size"] == 8
    assert set(res["timings"]) == {"1", "8"} and set(res["goals"]) == {"dense_deploy_vs_dense_eager_fp32",
                                                                      "channel_0.5_deploy_vs_dense_deploy"}
    assert all(a["agreement"] == 1.0 for a in res["agreement"].values())
    assert res["setup"]["cpu_capability"] and res["deploy"]["dtype"] in ("float32", "bfloat16")
    c = res["ceiling"]
    assert c["gemm_n"] == 1024 and c["gemm_gmacs"] > 0 and c["dense_deploy_macs_per_image"] > 0
    assert "Arithmetic ceiling" in (tmp_path / next(p.name for p in tmp_path.iterdir() if p.suffix == ".md")).read_text()


def test_deploy_speed_ceiling_arithmetic():
    from benchmarks.deploy_speed import GOAL, ceiling

    timings = {"128": {"p50_ms": {"dense_deploy": {"p50": 500.0}, "dense_eager": {"p50": 1000.0}}}}
    c = ceiling(timings, 128, 10**9, rate=512.0, n=4096)
    assert c["dense_deploy_gmacs"] == pytest.approx(128 * 1e9 / 0.5 / 1e9)  # 256 GMAC/s
    assert c["dense_deploy_of_gemm"] == pytest.approx(0.5)
    assert c["goal_needs_gmacs"] == pytest.approx(128 / (1.0 / GOAL))  # the eager time divided by the goal
    assert c["goal_needs_of_gemm"] == pytest.approx(128 * GOAL / 512)


def test_time_together_takes_turns_with_every_candidate():
    from prunelab.deploy.timing import time_together

    CALLS.clear()
    res = time_together(Tagged("d"), {"c0": (Tagged("a", seed=1), "channel"), "c1": (Tagged("b", seed=2), "magnitude")},
                        torch.randn(4, 3, 8, 8), "cpu", lat_cfg(), channels_last=False)
    w, n = 1, 3
    # each deploy form runs its example batch and then the batch once, untimed; then warm-up, then
    # turns whose order rotates every iteration
    assert CALLS == ["d", "a", "b"] * 2 + ["d"] * w + ["a"] * w + ["b"] * w + ["d", "a", "b", "a", "b", "d", "b", "d", "a"]
    m = res["models"]
    assert set(m) == {"dense", "c0", "c1"} and res["iters"] == n and res["batch_size"] == 4
    assert m["c0"]["speedup_p50"] == pytest.approx(m["dense"]["p50"] / m["c0"]["p50"])
    assert m["c1"]["speedup_beyond_noise"] is False  # unstructured zeros never count as faster
    assert {k: len(v) for k, v in res["samples"].items()} == {"dense": n, "c0": n, "c1": n}
    assert res["runtime"]["runtime"] == "deploy" and res["runtime"]["layout"] == "contiguous"
    with pytest.raises(ValueError, match="at least one candidate"):
        time_together(Tagged("d"), {}, torch.randn(4, 3, 8, 8), "cpu", lat_cfg())
    dense = Tagged("d")
    with pytest.raises(ValueError, match="dense module itself"):
        time_together(dense, {"c0": (dense, "channel")}, torch.randn(4, 3, 8, 8), "cpu", lat_cfg())


def test_time_together_runs_two_four_candidates_masked_dense_on_cpu_and_says_so():
    from prunelab.deploy.timing import time_together

    dense = tiny_vgg()
    two_four = SemiStructuredPruner(copy.deepcopy(dense)).finish(0.3)
    res = time_together(dense, {"c0": (two_four, "semi_structured")}, X[:4], "cpu", lat_cfg(dtype="float32"))
    assert "masked-dense" in res["models"]["c0"]["kernels"]


def test_deploy_speed_renders_absolute_cuda_goals_and_what_the_2_4_form_ran_on():
    from benchmarks.deploy_speed import _goal_row, _kernels

    assert _goal_row("dense_deploy_p50_ms_batch128", {"goal_ms": 0.5, "measured_ms": 0.61, "met": False}) == \
        ("dense_deploy_p50_ms_batch128", "<= 0.5 ms", "0.610 ms", "no")
    assert _goal_row("dense_deploy_vs_dense_eager_fp32", {"goal": 2.5, "measured": 3.0, "met": True})[1:] == \
        (">= 2.5x", "3.00x", "yes")
    assert _kernels({"deploy": {"forms": {"dense_deploy": {}}}}) == []  # no 2:4 form timed (CPU)
    note = _kernels({"deploy": {"forms": {"semi_deploy": {"kernels": "1 Linear layer(s) on cusparselt: classifier.3"}}}})
    assert "classifier.3" in note[0] and "convolutions" in note[0]


@pytest.mark.slow
def test_deploy_speed_times_the_float32_form_where_auto_chose_bf16(tmp_path, monkeypatch):
    """On a native-bf16 CPU the benchmark checks the dtype rule against the float32 form (faked here)."""
    from benchmarks import deploy_speed
    from prunelab.hardware import Resolution

    monkeypatch.setattr(deploy_speed, "resolve_dtype", lambda requested, hw: Resolution(torch.bfloat16, "faked"))
    res = deploy_speed.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--iters", "1",
                             "--iters-small", "1"])
    assert res["deploy"]["dtype"] == "bfloat16"
    fp32 = res["deploy"]["forms"]["dense_deploy_fp32"]
    assert fp32["dtype"] == "float32"
    assert all("dense_deploy_vs_dense_deploy_fp32" in t for t in res["timings"].values())
    assert res["agreement"]["dense_deploy_fp32"]["agreement"] == 1.0
    md = next(p for p in tmp_path.iterdir() if p.suffix == ".md").read_text()
    assert "dense deploy in bfloat16 (auto) vs the same network's float32 deploy form" in md
