"""3x3 convolutions by Winograd F(4x4,3x3) and small-map GEMMs, and the per-shape choice among them."""

import pytest
import torch
import torch.nn.functional as F
from test_channel import tiny_vgg
from torch import nn

from conftest import compose_cfg
from prunelab import hardware, resolve
from prunelab.deploy.native import deploy_form
from prunelab.errors import ConfigError
from prunelab.hardware import Hardware, resolve_winograd
from prunelab.models import tuning
from prunelab.models import winograd as wg
from prunelab.models.winograd import (
    TunedConv2d,
    conv_algos,
    map_conv,
    map_matrix,
    pick,
    tune_convs,
    winograd_conv3x3,
    winograd_filters,
)
from prunelab.report.markdown import _conv_algos

GEN = torch.Generator().manual_seed(0)


@pytest.fixture(autouse=True)
def fresh_decisions():
    """Each test times its own layers (choices are otherwise shared within the process)."""
    wg.clear_decisions()
    yield
    wg.clear_decisions()
AVX2 = Hardware("cpu", "AMD EPYC", "AVX2", frozenset({"avx2"}))
AMX = Hardware("cpu", "Xeon Sapphire Rapids", "AVX512", frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}))
SM90 = Hardware("cuda", "NVIDIA H100", "AVX512", frozenset({"avx2", "avx512f"}), (9, 0))


def conv_and_input(n, c, k, h, w, bias=True, channels_last=False):
    conv = nn.Conv2d(c, k, 3, padding=1, bias=bias)
    x = torch.randn(n, c, h, w, generator=GEN)
    return conv, x.to(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("n,c,k,h,w", [(2, 3, 5, 7, 9), (1, 16, 8, 8, 8), (3, 8, 4, 1, 1), (2, 4, 6, 4, 13),
                                       (1, 32, 32, 2, 2)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_winograd_equals_the_convolution(n, c, k, h, w, channels_last, bias):
    conv, x = conv_and_input(n, c, k, h, w, bias, channels_last)
    with torch.no_grad():
        ref = conv(x)
        out = winograd_conv3x3(x, winograd_filters(conv.weight), conv.bias)
        # a wrong filter transform (taps swapped top to bottom) must fail the same comparison
        flipped = winograd_conv3x3(x, winograd_filters(conv.weight.flip(-2)), conv.bias)
    assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
    # float32 rounding of the transforms: ~1e-5 of the outputs' scale, far from any real error
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max(), (out - ref).abs().max()
    if h > 1:  # on a 1-pixel-high map only the middle row of taps sees data, and it does not move
        assert (flipped - ref).abs().max() > 1e-2 * ref.abs().max()


def test_winograd_filters_refuse_other_kernel_sizes():
    with pytest.raises(ValueError, match=r"\(K, C, 3, 3\)"):
        winograd_filters(torch.zeros(4, 3, 5, 5))


@pytest.mark.parametrize("h,w", [(1, 1), (1, 2), (2, 2)])
def test_small_map_matrix_is_the_convolution(h, w):
    conv, x = conv_and_input(3, 8, 6, h, w, channels_last=True)
    m = map_matrix(conv, h, w)
    assert m.shape == (h * w * 8, h * w * 6)
    # every entry is one filter weight: input pixel (0,0) channel c -> output pixel (0,0) channel k is the centre tap
    assert torch.equal(m[: 8, : 6], conv.weight.detach()[:, :, 1, 1].t())
    with torch.no_grad():
        ref, out = conv(x), map_conv(x, m, conv.bias)
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_pick_keeps_an_alternative_only_when_clearly_faster():
    assert pick({"direct": 10.0, "winograd": 6.0, "map": 7.0}) == "winograd"
    assert pick({"direct": 10.0, "winograd": 9.8}) == "direct"  # within the 5% margin: not worth a change
    assert pick({"direct": 10.0, "winograd": 12.0, "map": 9.0}) == "map"
    assert pick({"direct": 1.0}) == "direct"
    with pytest.raises(ValueError, match="direct"):
        pick({"winograd": 1.0})


def test_tuned_conv_is_the_convolution_in_every_algorithm_and_keeps_its_parameters():
    conv, x = conv_and_input(4, 16, 16, 2, 2, channels_last=True)
    tuned = TunedConv2d(conv)
    assert isinstance(tuned, nn.Conv2d) and tuned.weight is conv.weight and tuned.bias is conv.bias
    with torch.no_grad():
        ref = conv(x)
        for algo in wg.ALGOS:
            assert torch.allclose(tuned.run(algo, x), ref, atol=1e-4), algo
            forced = TunedConv2d(conv, algo)
            assert torch.allclose(forced(x), ref, atol=1e-4) and not forced.choice  # forced: nothing tuned
        out = tuned(x)
    assert torch.allclose(out, ref, atol=1e-4)
    key = TunedConv2d.shape_key(x)
    assert tuned.choice[key] in wg.ALGOS and set(tuned.tune_ms[key]) == {"direct", "winograd", "map"}
    with pytest.raises(ValueError, match="auto or one of"):
        TunedConv2d(conv, "fft")
    with pytest.raises(ValueError, match="plain 3x3"):
        TunedConv2d(nn.Conv2d(4, 4, 3, stride=2, padding=1))


def test_each_shape_is_tuned_once_and_the_choice_is_followed(monkeypatch):
    conv, x = conv_and_input(2, 8, 8, 8, 8)
    tuned, calls = TunedConv2d(conv), []
    real = TunedConv2d._tune

    def counting(self, x, key):
        calls.append(key)
        return real(self, x, key)

    monkeypatch.setattr(TunedConv2d, "_tune", counting)
    xl = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        tuned(x), tuned(x), tuned(x[:1]), tuned(x[:1]), tuned(xl), tuned(xl)
    key = TunedConv2d.shape_key
    assert calls == [key(x), key(x[:1]), key(xl)]  # each shape and layout once
    assert key(x)[:4] == tuple(x.shape) and key(x)[4:] == ("nchw", torch.get_num_threads())
    assert conv_algos(nn.Sequential(tuned)) == {1: {tuned.choice[key(x[:1])]: 1},
                                                 2: {a: [tuned.choice[key(x)], tuned.choice[key(xl)]].count(a)
                                                     for a in {tuned.choice[key(x)], tuned.choice[key(xl)]}}}
    record = wg.tune_record(nn.Sequential(tuned))
    assert len(record) == 3 and {r["layout"] for r in record} == {"nchw", "nhwc"}
    assert all(set(r["ms"]) >= {"direct"} and r["choice"] in wg.ALGOS for r in record)
    # the recorded choice is what runs (set one by hand and watch which path is taken)
    used = []
    real_conv = nn.Conv2d.forward
    monkeypatch.setattr(TunedConv2d, "run", lambda self, algo, x: used.append(algo) or real_conv(self, x))
    tuned.choice[key(x)] = "winograd"
    with torch.no_grad():
        tuned(x)
    assert used == ["winograd"]


def test_layers_of_one_geometry_share_one_choice(monkeypatch):
    conv, x = conv_and_input(2, 8, 8, 4, 4)
    first, twin = TunedConv2d(conv), TunedConv2d(nn.Conv2d(8, 8, 3, padding=1))  # same shapes, other weights
    wider = TunedConv2d(nn.Conv2d(8, 16, 3, padding=1))  # another output width: its own timing
    timed = []
    real = TunedConv2d.run

    def counting_run(self, algo, x):
        timed.append(id(self))
        return real(self, algo, x)

    monkeypatch.setattr(TunedConv2d, "run", counting_run)
    with torch.no_grad():
        first(x)
        n_first = timed.count(id(first))
        twin(x), wider(x)
    key = TunedConv2d.shape_key(x)
    assert n_first > 2  # timed: an untimed call and rounds of each algorithm
    assert timed.count(id(twin)) == 1  # only the call that computes its output
    assert twin.choice[key] == first.choice[key] and twin.tune_ms[key] == first.tune_ms[key]
    assert timed.count(id(wider)) > 2
    assert [r["reused"] for r in wg.tune_record(nn.Sequential(first, twin, wider))] == [False, True, False]
    wg.clear_decisions()
    again = TunedConv2d(nn.Conv2d(8, 8, 3, padding=1))
    with torch.no_grad():
        again(x)
    assert timed.count(id(again)) > 2  # forgotten: timed anew


def test_direct_wherever_the_fast_paths_do_not_apply():
    conv, x = conv_and_input(2, 8, 8, 4, 4)
    # gradients wanted: the transformed filters are constants, so the plain convolution runs (exactly)
    y = TunedConv2d(conv, "winograd")(x)
    assert torch.equal(y, conv(x)) and y.requires_grad
    # bf16 (or any dtype but float32): the plain convolution, and nothing tuned
    bf = TunedConv2d(nn.Conv2d(8, 8, 3, padding=1).bfloat16())
    with torch.no_grad():
        xb = x.bfloat16()
        assert torch.equal(bf(xb), F.conv2d(xb, bf.weight, bf.bias, padding=1))
    assert not bf.choice


def test_a_trainable_bias_alone_keeps_the_plain_convolution():
    conv, x = conv_and_input(2, 8, 8, 4, 4)
    conv.weight.requires_grad_(False)
    y = TunedConv2d(conv, "winograd")(x)  # the Winograd path cannot carry the bias's gradient
    y.sum().backward()
    assert conv.bias.grad is not None and torch.equal(y, conv(x))


@pytest.mark.parametrize("algo", ["winograd", "map"])
def test_alternatives_return_the_callers_layout(algo):
    conv, x = conv_and_input(2, 8, 8, 2, 2)
    tuned = TunedConv2d(conv, algo)
    with torch.no_grad():
        nchw, nhwc = tuned(x), tuned(x.to(memory_format=torch.channels_last))
    assert nchw.is_contiguous() and nhwc.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(nchw, nhwc)


def test_filters_follow_an_in_place_weight_change():
    conv, x = conv_and_input(2, 8, 8, 4, 4)
    tuned = TunedConv2d(conv, "winograd")
    with torch.no_grad():
        before = tuned(x)
        conv.weight.mul_(2)
        after = tuned(x)
        assert torch.allclose(after - conv.bias.view(1, -1, 1, 1), 2 * (before - conv.bias.view(1, -1, 1, 1)),
                              atol=1e-4)


def test_changes_outside_the_version_counter():
    conv, x = conv_and_input(2, 8, 8, 4, 4)
    tuned = TunedConv2d(conv, "winograd")
    with torch.no_grad():
        tuned(x)
        conv.weight.data.mul_(2)  # .data: autograd's version counter does not see it
        tuned.invalidate()
        assert torch.allclose(tuned(x), conv(x), atol=1e-4)
    with torch.inference_mode():  # inference-mode weights: no counter, so nothing is cached
        inf = TunedConv2d(nn.Conv2d(8, 8, 3, padding=1), "winograd")
        xi = x.clone()
        inf(xi)
        inf.weight.mul_(-1)
        assert torch.allclose(inf(xi), F.conv2d(xi, inf.weight, inf.bias, padding=1), atol=1e-4)


def test_tune_convs_wraps_only_plain_3x3_convolutions_and_keeps_the_state_dict():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                        nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.Conv2d(8, 8, 3, padding=1))
    keys = list(net.state_dict())
    assert tune_convs(net) == 2
    assert [type(m).__name__ for m in net] == ["TunedConv2d", "Conv2d", "Conv2d", "Conv2d", "TunedConv2d"]
    assert list(net.state_dict()) == keys
    assert tune_convs(net) == 0  # already tuned layers are left alone


def test_cpu_fp32_deploy_form_chooses_per_layer_and_keeps_the_answers():
    net = tiny_vgg().eval()
    x = torch.randn(4, 3, 32, 32, generator=GEN)
    form = deploy_form(net, channels_last=True, example_batch=x)
    plain = deploy_form(net, channels_last=True, example_batch=x, winograd=False)
    d = form.describe()
    assert d["winograd"] == sum(isinstance(m, TunedConv2d) for m in form.net.modules()) > 0
    assert sum(d["conv_algos"]["4"].values()) == d["winograd"]
    assert plain.describe()["winograd"] == 0 and plain.describe()["conv_algos"] == {}
    with torch.no_grad():
        ref = net(x)
        assert torch.allclose(form(x), ref, atol=1e-4) and torch.allclose(plain(x), ref, atol=1e-4)
    assert not any(isinstance(m, TunedConv2d) for m in net.modules())  # the caller's network untouched
    with pytest.raises(ValueError, match="float32"):
        deploy_form(net, dtype=torch.bfloat16, winograd=True)
    assert deploy_form(net, dtype=torch.bfloat16).describe()["winograd"] == 0  # auto: off in bf16


def test_a_magnitude_pruned_copy_runs_the_dense_forms_algorithms():
    """Timed in turns, dense and pruned must differ by what pruning changed, not by a tuning draw."""
    net = tiny_vgg().eval()
    pruned = tiny_vgg().eval()
    pruned.load_state_dict(net.state_dict())
    with torch.no_grad():
        for m in pruned.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(m.weight.abs() > m.weight.abs().median())  # half the weights zero
    x = torch.randn(4, 3, 32, 32, generator=GEN)
    dense, sparse = (deploy_form(n, channels_last=True, example_batch=x) for n in (net, pruned))
    assert dense.describe()["conv_algos"] == sparse.describe()["conv_algos"]
    assert all(r["reused"] for r in sparse.describe()["conv_tuning"])
    assert not any(r["reused"] for r in dense.describe()["conv_tuning"])


@pytest.mark.parametrize("algo", ["winograd", "map"])
def test_deploy_form_answers_through_each_alternative(monkeypatch, algo):
    """Whatever the timings, each alternative must keep the form's answers: force the choice."""
    monkeypatch.setattr(tuning, "pick", lambda times, margin=tuning.MARGIN, base="direct":
                        algo if algo in times else base)
    net = tiny_vgg().eval()
    x = torch.randn(4, 3, 32, 32, generator=GEN)
    form = deploy_form(net, channels_last=True, example_batch=x)
    counts = form.describe()["conv_algos"]["4"]
    assert counts.get(algo, 0) > 0
    with torch.no_grad():
        assert torch.allclose(form(x), net(x), atol=1e-4)


def test_resolve_winograd():
    assert resolve_winograd("auto", AVX2, torch.float32).value is True
    assert resolve_winograd("auto", AVX2, "float32").value is True  # as Hydra passes the resolved dtype
    assert resolve_winograd("auto", AMX, "bfloat16").value is False
    assert resolve_winograd("auto", SM90, torch.float32).value is False
    assert resolve_winograd("auto", AVX2, torch.float32, compile=True).value is False
    assert resolve_winograd(False, AVX2).value is False and resolve_winograd("true", AVX2).value is True
    for hw, dtype, kw in [(SM90, torch.float32, {}), (AMX, torch.bfloat16, {}), (AVX2, torch.float32, {"compile": True})]:
        with pytest.raises(ConfigError, match="latency.winograd=auto or latency.winograd=false"):
            resolve_winograd(True, hw, dtype, **kw)
    eager = resolve_winograd(True, AVX2, runtime="eager")
    assert eager.value is False and "no effect" in eager.warning
    assert resolve_winograd("auto", AVX2, "FP32").value is True  # spelled as latency.dtype accepts it
    assert resolve_winograd("auto", AVX2, "auto").value is True  # auto: fp32 on this CPU
    assert resolve_winograd("auto", AMX, "auto").value is False  # auto: bf16 there
    with pytest.raises(ConfigError, match="latency.winograd"):
        resolve_winograd("yes", AVX2)


@pytest.mark.parametrize("hw,expected", [(AVX2, True), (AMX, False), (SM90, False)])
def test_composed_config_resolves_winograd_after_the_dtype(tmp_path, monkeypatch, hw, expected):
    monkeypatch.setattr(hardware, "detect", lambda device="cpu": hw)
    cfg = compose_cfg(tmp_path, ["+experiment=smoke"])
    assert cfg.latency.winograd == "auto"
    record = resolve.resolve_auto(cfg)
    assert cfg.latency.winograd is expected and record["latency.winograd"]["value"] is expected


def test_report_names_the_algorithms_at_the_headline_batch():
    text = _conv_algos({"dense": {"128": {"winograd": 6, "map": 3, "direct": 4}, "1": {"direct": 13}}}, 128)
    assert "dense 4 direct, 3 map, 6 winograd" in text
    assert _conv_algos({"dense": {"1": {"direct": 13}}}, 128) == "" and _conv_algos(None, 128) == ""
