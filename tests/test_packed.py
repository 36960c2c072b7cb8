"""Prepacked Linear layers, the shared per-layer tuning, and Winograd's reused scratch buffers."""

import pytest
import torch
import torch.nn.functional as F
from test_channel import tiny_vgg
from torch import nn

from prunelab.deploy.native import deploy_form
from prunelab.models import packed, tuning
from prunelab.models import winograd as wg
from prunelab.models.packed import TunedLinear, linear_algos, tune_linears

GEN = torch.Generator().manual_seed(0)
needs_onednn = pytest.mark.skipif(not packed.available(), reason="this PyTorch has no oneDNN prepacked linear")


@pytest.fixture(autouse=True)
def fresh_decisions():
    tuning.clear_decisions()
    yield
    tuning.clear_decisions()


@needs_onednn
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_packed_linear_is_the_linear(rows):
    w, b = torch.randn(48, 40, generator=GEN), torch.randn(48, generator=GEN)
    x = torch.randn(rows, 40, generator=GEN)
    p = packed.pack_weight(w)
    assert torch.allclose(packed.linear(x, p, b), F.linear(x, w, b), atol=1e-5)
    assert torch.allclose(packed.linear(x, p, None), F.linear(x, w), atol=1e-5)
    # A transposed weight packs as what it is, not as its storage.
    assert torch.allclose(packed.linear(x, packed.pack_weight(w.t().contiguous().t()), b), F.linear(x, w, b), atol=1e-5)


@needs_onednn
def test_pack_weight_refuses_what_it_cannot_pack():
    with pytest.raises(ValueError, match="2-D float32 CPU"):
        packed.pack_weight(torch.randn(4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="2-D float32 CPU"):
        packed.pack_weight(torch.randn(4, 4, 4))


def _lin(algo="auto"):
    lin = nn.Linear(40, 24)
    return lin, TunedLinear(lin, algo)


def test_tuned_linear_shares_the_parameters():
    lin, tuned = _lin()
    assert tuned.weight is lin.weight and tuned.bias is lin.bias
    assert list(tuned.state_dict()) == list(lin.state_dict())
    with pytest.raises(ValueError, match="plain nn.Linear"):
        TunedLinear(nn.Bilinear(2, 2, 2))
    with pytest.raises(ValueError, match="algo='fast'"):
        TunedLinear(nn.Linear(2, 2), "fast")


@needs_onednn
@pytest.mark.parametrize("algo", ["plain", "packed", "auto"])
def test_tuned_linear_answers_in_every_way(algo):
    lin, tuned = _lin(algo)
    x = torch.randn(16, 40, generator=GEN)
    with torch.no_grad():
        assert torch.allclose(tuned(x), lin(x), atol=1e-5)
    if algo == "auto":  # tuned once for this shape, and the recorded choice is one of the two
        key = tuned.shape_key(x)
        assert tuned.choice[key] in packed.ALGOS and set(tuned.tune_ms[key]) == set(packed.ALGOS)


@needs_onednn
def test_tuned_linear_follows_in_place_weight_changes():
    lin, tuned = _lin("packed")
    x = torch.randn(8, 40, generator=GEN)
    with torch.no_grad():
        before = tuned(x)
        lin.weight.mul_(2)  # bumps the version counter: the packed copy must be remade
        after = tuned(x)
        assert torch.allclose(after - lin.bias, 2 * (before - lin.bias), atol=1e-4)
        lin.weight.data.zero_()  # bypasses the counter: stale until invalidate()
        assert not torch.allclose(tuned(x), lin.bias.expand(8, -1))
        tuned.invalidate()
        assert torch.allclose(tuned(x), lin.bias.expand(8, -1))


@needs_onednn
def test_tuned_linear_runs_plain_for_gradients_and_other_inputs():
    lin, tuned = _lin("packed")
    with torch.no_grad():
        x = torch.randn(3, 5, 40, generator=GEN)  # 3-D, no gradients: still not packed
        assert torch.allclose(tuned(x), lin(x))
    assert tuned._cache == {}
    x2 = torch.randn(4, 40, generator=GEN, requires_grad=True)
    tuned(x2).sum().backward()  # the packed kernel has no backward: a training step must still work
    assert x2.grad is not None and lin.weight.grad is not None
    assert tuned._cache == {}
    with torch.no_grad():
        tuned(x2)  # the same batch without gradients takes the packed kernel
    assert [k[0] for k in tuned._cache] == ["packed"]


@needs_onednn
def test_choices_are_shared_by_geometry():
    a, b = TunedLinear(nn.Linear(40, 24)), TunedLinear(nn.Linear(40, 24))
    x = torch.randn(8, 40, generator=GEN)
    with torch.no_grad():
        a(x), b(x)
    key = a.shape_key(x)
    assert key not in a.reused and key in b.reused and b.choice[key] == a.choice[key]
    c = TunedLinear(nn.Linear(40, 12))  # other output size: timed on its own
    with torch.no_grad():
        c(x)
    assert key not in c.reused


def test_pick_uses_the_layer_s_own_base():
    assert tuning.pick({"plain": 1.0, "packed": 0.9}, base="plain") == "packed"
    assert tuning.pick({"plain": 1.0, "packed": 0.97}, base="plain") == "plain"  # within the margin
    with pytest.raises(ValueError, match="plain"):
        tuning.pick({"direct": 1.0}, base="plain")


@needs_onednn
def test_deploy_form_packs_linears_on_float32_cpu_only():
    net = tiny_vgg().eval()
    n_lin = sum(type(m) is nn.Linear for m in net.modules())
    x = torch.randn(4, 3, 32, 32, generator=GEN)
    form = deploy_form(net, example_batch=x)
    d = form.describe()
    assert d["packed_linear"] == n_lin > 0
    assert sum(d["linear_algos"]["4"].values()) == n_lin
    assert {r["choice"] for r in d["linear_tuning"]} <= set(packed.ALGOS)
    with torch.no_grad():
        assert torch.allclose(form(x), net(x), atol=1e-4)
    assert deploy_form(net, pack=False).describe()["packed_linear"] == 0
    assert deploy_form(net, dtype=torch.bfloat16).describe()["packed_linear"] == 0  # auto: float32 only
    with pytest.raises(ValueError, match="pack=True"):
        deploy_form(net, dtype=torch.bfloat16, pack=True)
    assert linear_algos(net) == {}  # the caller's network is never wrapped


def test_tune_linears_skips_what_is_not_a_plain_linear():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    assert tune_linears(net) == 2 and all(isinstance(net[i], TunedLinear) for i in (0, 2))
    assert tune_linears(net) == 0  # already wrapped


@pytest.mark.parametrize("first, second", [((9, 9), (5, 5)), ((5, 7), (8, 8)), ((8, 8), (3, 3))])
def test_winograd_scratch_is_reused_without_leaking_between_shapes(first, second):
    """Layers share the scratch buffers: a smaller map after a larger one must see zero padding, not
    the larger map's values (a border that is not re-zeroed gives wrong edges)."""
    convs = [nn.Conv2d(6, 5, 3, padding=1), nn.Conv2d(6, 5, 3, padding=1)]
    for conv, (h, w) in zip(convs, (first, second), strict=True):
        x = torch.randn(2, 6, h, w, generator=GEN) * 10 + 5
        with torch.no_grad():
            out = wg.winograd_conv3x3(x, wg.winograd_filters(conv.weight), conv.bias)
            assert torch.allclose(out, conv(x), atol=1e-3)
    buf = wg.scratch("padded", (2, 3), torch.float32, torch.device("cpu"))
    assert buf.data_ptr() == wg.scratch("padded", (3, 2), torch.float32, torch.device("cpu")).data_ptr()
    wg.free_scratch()
    assert not wg._SCRATCH.pool


def test_winograd_scratch_made_in_inference_mode_works_outside_it():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    filters = wg.winograd_filters(conv.weight)
    wg.free_scratch()
    x = torch.randn(1, 4, 6, 6, generator=GEN)
    with torch.inference_mode():
        wg.winograd_conv3x3(x, filters, conv.bias)
    with torch.no_grad():
        assert torch.allclose(wg.winograd_conv3x3(x, filters, conv.bias), conv(x), atol=1e-4)


def test_report_names_the_linear_layers_ways():
    from prunelab.report.markdown import _conv_algos

    text = _conv_algos({"dense": {"128": {"packed": 2, "plain": 1}}}, 128, "Linear layers")
    assert text == ", Linear layers by measured fastest algorithm (dense 2 packed, 1 plain)"


def test_deploy_timing_gives_the_scratch_buffers_back():
    from test_runtime import X, lat_cfg

    from prunelab.deploy.timing import time_dense_and_pruned

    wg.scratch("a", (1024,), torch.float32, torch.device("cpu"))  # as a Winograd layer would leave it
    res = time_dense_and_pruned(tiny_vgg(), None, None, {4: X[:4]}, "cpu",
                                lat_cfg(batch_sizes=[4], dtype="float32", iters=2, warmup=1))
    assert res["runtime"]["runtime"] == "deploy"
    assert not wg._SCRATCH.pool


@needs_onednn
@pytest.mark.parametrize("channels_last", [True, False])
def test_deploy_form_answers_through_packed_kernels(monkeypatch, channels_last):
    """Whatever the timings: force every Linear packed and every small map through the packed matrix."""
    monkeypatch.setattr(tuning, "pick", lambda times, margin=tuning.MARGIN, base="direct":
                        "packed" if "packed" in times else "map" if "map" in times else base)
    net = tiny_vgg().eval()
    x = torch.randn(5, 3, 32, 32, generator=GEN)
    form = deploy_form(net, channels_last=channels_last, example_batch=x)
    d = form.describe()
    assert d["linear_algos"]["5"] == {"packed": d["packed_linear"]}
    maps = [v for m in form.net.modules() if isinstance(m, wg.TunedConv2d) for k, v in m._cache.items()
            if k[0][0] == "map"]
    assert maps and all(v.is_mkldnn for v in maps)  # the small-map matrices, prepacked
    with torch.no_grad():
        assert torch.allclose(form(x), net(x), atol=1e-4)


@needs_onednn
def test_a_used_deploy_form_copies_and_pickles():
    """oneDNN's packed tensors have no storage: the derived cache is left out of copies and remade."""
    import copy
    import io

    monkeypatch_pick = tuning.pick
    try:
        tuning.pick = lambda times, margin=tuning.MARGIN, base="direct": (
            "packed" if "packed" in times else "map" if "map" in times else base)
        net = tiny_vgg().eval()
        x = torch.randn(3, 3, 32, 32, generator=GEN)
        form = deploy_form(net, example_batch=x)
    finally:
        tuning.pick = monkeypatch_pick
    with torch.no_grad():
        ref = form(x)
        twin = copy.deepcopy(form)
        assert torch.allclose(twin(x), ref)
        buf = io.BytesIO()
        torch.save(form.net, buf)
        buf.seek(0)
        assert torch.allclose(torch.load(buf, weights_only=False)(x.contiguous(memory_format=torch.channels_last)),
                              ref, atol=1e-5)
    assert any(m._cache for m in form.net.modules() if isinstance(m, tuning.Tuned))  # the original keeps its own


def test_resolve_pack():
    from test_winograd import AMX, AVX2, SM90

    from prunelab.errors import ConfigError
    from prunelab.hardware import resolve_pack

    assert resolve_pack("auto", AVX2, torch.float32).value is True
    assert resolve_pack("auto", AVX2, "float32", onednn=False).value is False
    assert resolve_pack("auto", AMX, "bfloat16").value is False
    assert resolve_pack("auto", SM90, "auto").value is False
    assert resolve_pack("auto", AVX2, torch.float32, compile=True).value is False
    assert resolve_pack(False, AVX2, torch.float32).value is False
    eager = resolve_pack(True, AVX2, torch.float32, runtime="eager")
    assert eager.value is False and "no effect" in eager.warning
    for hw, dtype, kw in ((SM90, "auto", {}), (AMX, "bfloat16", {}), (AVX2, "float32", {"onednn": False}),
                          (AVX2, "float32", {"compile": True})):
        with pytest.raises(ConfigError, match="latency.pack=true"):
            resolve_pack(True, hw, dtype, **kw)


@pytest.mark.parametrize("hw_name,expected", [("AVX2", True), ("AMX", False), ("SM90", False)])
def test_composed_config_resolves_pack_after_the_dtype(tmp_path, monkeypatch, hw_name, expected):
    import test_winograd

    from conftest import compose_cfg
    from prunelab import hardware, resolve

    monkeypatch.setattr(hardware, "detect", lambda device="cpu": getattr(test_winograd, hw_name))
    cfg = compose_cfg(tmp_path, ["+experiment=smoke"])
    assert cfg.latency.pack == "auto"
    record = resolve.resolve_auto(cfg)
    expected = expected and packed.available()
    assert cfg.latency.pack is expected and record["latency.pack"]["value"] is expected


def test_latency_pack_must_be_auto_or_a_bool(tmp_path):
    from conftest import compose_cfg
    from prunelab.config_check import check_values
    from prunelab.errors import ConfigError

    cfg = compose_cfg(tmp_path, ["+experiment=smoke", "latency.pack=maybe"])
    with pytest.raises(ConfigError, match="latency.pack"):
        check_values(cfg)
