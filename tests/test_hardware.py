"""Resolving ``auto`` precision/dtype/fast paths from faked and from this machine's hardware."""

from pathlib import Path

import pytest
import torch

from prunelab.errors import ConfigError
from prunelab.hardware import (
    PRECISION_ALIASES,
    PRECISIONS,
    Hardware,
    _cpuinfo,
    detect,
    resolve_channels_last,
    resolve_compile,
    resolve_deploy_layout,
    resolve_dtype,
    resolve_fuse,
    resolve_precision,
)

AVX2 = Hardware("cpu", "AMD EPYC", "AVX2", frozenset({"avx2"}))
AVX512 = Hardware("cpu", "Xeon Skylake", "AVX512", frozenset({"avx2", "avx512f"}))
AVX512_BF16 = Hardware("cpu", "Xeon Cooper Lake", "AVX512", frozenset({"avx2", "avx512f", "avx512_bf16"}))
AMX = Hardware("cpu", "Xeon Sapphire Rapids", "AVX512",
               frozenset({"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}))
SM75 = Hardware("cuda", "Tesla T4", "AVX2", frozenset({"avx2"}), (7, 5))
SM80 = Hardware("cuda", "NVIDIA A100", "AVX2", frozenset({"avx2"}), (8, 0))
SM90 = Hardware("cuda", "NVIDIA H100", "AVX512", frozenset({"avx2", "avx512f"}), (9, 0))
MPS = Hardware("mps", "mps")
PLAIN = Hardware("cpu", "old CPU", "DEFAULT", frozenset())  # no vector unit ATen dispatches to

# hw, native bf16, auto precision, auto dtype, auto channels_last (training), auto compile,
# auto latency.channels_last (deploy)
TABLE = [
    (AVX2, False, "32-true", torch.float32, False, False, True),
    (AVX512, False, "32-true", torch.float32, True, False, True),
    (AVX512_BF16, True, "bf16-mixed", torch.bfloat16, True, False, True),
    (AMX, True, "bf16-mixed", torch.bfloat16, True, False, True),
    (SM75, False, "16-mixed", torch.float16, True, True, True),
    (SM80, True, "bf16-mixed", torch.bfloat16, True, True, True),
    (SM90, True, "bf16-mixed", torch.bfloat16, True, True, True),
    (MPS, False, "32-true", torch.float32, False, False, False),
    (PLAIN, False, "32-true", torch.float32, False, False, False),
]
IDS = ["avx2", "avx512", "avx512_bf16", "amx", "sm75", "sm80", "sm90", "mps", "plain"]


@pytest.mark.parametrize("hw,bf16,precision,dtype,channels_last,compile_,deploy_layout", TABLE, ids=IDS)
def test_auto_follows_the_hardware(hw, bf16, precision, dtype, channels_last, compile_, deploy_layout):
    assert hw.native_bf16 is bf16
    for got, want in [
        (resolve_precision("auto", hw), precision),
        (resolve_dtype("auto", hw), dtype),
        (resolve_channels_last("auto", hw), channels_last),
        (resolve_compile("auto", hw), compile_),
        (resolve_deploy_layout("auto", hw), deploy_layout),
    ]:
        assert got.value == want and type(got.value) is type(want)
        assert got.warning is None  # auto never picks something slow
        assert got.reason.startswith("auto: ") and str(want) in got.reason


def test_reason_explains_the_emulated_bf16_case():
    reason = resolve_precision("auto", AVX2).reason
    assert "AVX2" in reason and "no native bf16" in reason and "emulated" in reason
    assert reason.endswith("using 32-true")
    assert "sm75" in resolve_precision("auto", SM75).reason
    assert "(amx_bf16/avx512_bf16) has native bf16" in resolve_precision("auto", AMX).reason


def test_amx_tile_without_amx_bf16_is_not_native_bf16():
    int8_only = Hardware("cpu", "x", "AVX512", frozenset({"avx512f", "amx_tile"}))
    assert not int8_only.native_bf16
    assert resolve_precision("auto", int8_only).value == "32-true"


# hw, requested, expected value, expected warning fragment (None: no warning)
PRECISION_CASES = [
    (AVX2, "bf16-mixed", "bf16-mixed", "emulated"),
    (AVX2, "bf16-true", "bf16-true", "emulated"),
    (AVX2, "bf16", "bf16-mixed", "emulated"),
    (AVX512, "bf16-mixed", "bf16-mixed", "emulated"),
    (AVX2, "16-mixed", "16-mixed", "runs bf16-mixed"),
    (AVX512_BF16, "16", "16-mixed", "runs bf16-mixed"),
    (AVX2, "32-true", "32-true", None),
    (AVX2, "32", "32-true", None),
    (AVX2, 32, "32-true", None),
    (AVX2, "64-true", "64-true", None),
    (AVX2, "transformer-engine", "transformer-engine", "Transformer Engine"),
    (AVX512_BF16, "bf16-mixed", "bf16-mixed", None),
    (AMX, "bf16-true", "bf16-true", None),
    (SM75, "bf16-mixed", "bf16-mixed", "emulated"),
    (SM75, "16-mixed", "16-mixed", None),
    (SM80, "bf16-mixed", "bf16-mixed", None),
    (SM80, "16-true", "16-true", None),
    (SM90, "32-true", "32-true", None),
    (SM90, "transformer-engine", "transformer-engine", None),
]


@pytest.mark.parametrize("hw,requested,value,warning", PRECISION_CASES)
def test_explicit_precision_is_honoured_and_warned_when_slow(hw, requested, value, warning):
    res = resolve_precision(requested, hw)
    assert res.value == value and res.reason.startswith("explicit trainer.precision=")
    if warning is None:
        assert res.warning is None
    else:
        assert warning in res.warning and "trainer.precision" in res.warning and "\n" not in res.warning


DTYPE_CASES = [
    (AVX2, "bfloat16", torch.bfloat16, "emulated"),
    (AVX2, "bf16", torch.bfloat16, "emulated"),
    (AVX2, torch.bfloat16, torch.bfloat16, "emulated"),
    (AVX2, "float16", torch.float16, "fp16 is poorly supported"),
    (AMX, "fp16", torch.float16, "fp16 is poorly supported"),
    (AVX2, "float32", torch.float32, None),
    (AVX2, "fp32", torch.float32, None),
    (AVX512_BF16, "bfloat16", torch.bfloat16, None),
    (SM75, "bf16", torch.bfloat16, "emulated"),
    (SM75, "float16", torch.float16, None),
    (SM80, "bfloat16", torch.bfloat16, None),
    (SM90, "FP16", torch.float16, None),
]


@pytest.mark.parametrize("hw,requested,value,warning", DTYPE_CASES)
def test_explicit_dtype_is_honoured_and_warned_when_slow(hw, requested, value, warning):
    res = resolve_dtype(requested, hw)
    assert res.value is value and res.reason.startswith("explicit latency.dtype=")
    if warning is None:
        assert res.warning is None
    else:
        assert warning in res.warning and "latency.dtype" in res.warning


@pytest.mark.parametrize("func,bad,key", [
    (resolve_precision, "bf17-mixed", "trainer.precision"),
    (resolve_precision, "fp32", "trainer.precision"),
    (resolve_precision, 8, "trainer.precision"),
    (resolve_dtype, "float64", "latency.dtype"),
    (resolve_dtype, "int8", "latency.dtype"),
    (resolve_channels_last, "sometimes", "model.channels_last"),
    (resolve_compile, "maybe", "model.compile"),
    (resolve_deploy_layout, "nhwc", "latency.channels_last"),
    (resolve_fuse, "yes", "latency.fuse"),
])
def test_unknown_values_raise_naming_the_key(func, bad, key):
    with pytest.raises(ValueError, match=key) as err:
        func(bad, AVX2)
    assert isinstance(err.value, ConfigError)  # the entry point prints it as one line
    assert "auto" in str(err.value)


def test_unknown_precision_lists_the_allowed_values():
    with pytest.raises(ValueError) as err:
        resolve_precision("fp8", SM90)
    for allowed in ("bf16-mixed", "16-mixed", "32-true", "64-true", "transformer-engine"):
        assert allowed in str(err.value)


def test_explicit_booleans_are_honoured():
    for func in (resolve_channels_last, resolve_compile, resolve_deploy_layout):
        for requested, value in [(True, True), (False, False), ("true", True), ("False", False)]:
            assert func(requested, AVX2).value is value
            assert func(requested, SM90).value is value


@pytest.mark.parametrize("hw", [AVX2, AMX, SM75, SM90, MPS], ids=["avx2", "amx", "sm75", "sm90", "mps"])
def test_fuse_is_cudas_and_gives_way_to_compile(hw):
    cuda = hw.kind == "cuda"
    assert resolve_fuse("auto", hw).value is cuda
    assert resolve_fuse("auto", hw, compile=True).value is False
    assert resolve_fuse(False, hw).value is False
    if cuda:
        assert resolve_fuse("true", hw).value is True
        with pytest.raises(ConfigError, match="latency.fuse=auto with latency.compile=true"):
            resolve_fuse("true", hw, compile=True)
    else:
        with pytest.raises(ConfigError, match="latency.fuse=auto or latency.fuse=false"):
            resolve_fuse(True, hw)
    # the eager runtime fuses nothing, anywhere; an explicit true is warned about, not refused
    assert resolve_fuse("auto", hw, runtime="eager").value is False
    assert resolve_fuse("auto", hw, runtime="eager").warning is None
    assert "no effect" in resolve_fuse(True, hw, runtime="eager").warning


def test_precision_list_matches_installed_lightning():
    connector = pytest.importorskip("lightning.fabric.connector")
    from typing import get_args

    assert set(PRECISIONS) == set(get_args(connector._PRECISION_INPUT_STR))
    assert PRECISION_ALIASES == connector._PRECISION_INPUT_STR_ALIAS_CONVERSION


def test_to_dict_is_plain_data():
    d = SM80.to_dict()
    assert d == {"kind": "cuda", "name": "NVIDIA A100", "cpu_capability": "AVX2", "cpu_flags": ["avx2"],
                 "cuda_capability": "8.0", "native_bf16": True}
    assert AVX2.to_dict()["cuda_capability"] is None and AVX2.to_dict()["native_bf16"] is False


def test_cpuinfo_parsing(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Intel Xeon\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile\n"
                    "processor\t: 1\nmodel name\t: Intel Xeon\nflags\t\t: fpu\n")
    assert _cpuinfo(str(info)) == ("Intel Xeon", frozenset({"avx2", "avx512f", "avx512_bf16", "amx_tile"}))
    name, flags = _cpuinfo(str(tmp_path / "absent"))  # e.g. macOS: falls back to torch's cpuinfo
    assert isinstance(name, str) and name and flags <= {"avx2", "avx512f", "avx512_bf16", "avx512_fp16",
                                                        "amx_tile", "amx_bf16", "amx_fp16"}


def test_detect_cpu_on_this_machine():
    hw = detect("cpu")
    assert hw.kind == "cpu" and hw.cuda_capability is None
    assert hw.cpu_capability == torch.backends.cpu.get_cpu_capability()
    assert detect(torch.device("cpu")) is hw  # cached
    proc = Path("/proc/cpuinfo")
    if not proc.exists():
        pytest.skip("no /proc/cpuinfo here")
    flags = set()
    for line in proc.read_text().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    assert hw.native_bf16 is bool(flags & {"avx512_bf16", "amx_bf16"})
    assert ("avx2" in hw.cpu_flags) is ("avx2" in flags)
    expected = "bf16-mixed" if hw.native_bf16 else "32-true"
    assert resolve_precision("auto", hw).value == expected


def test_detect_cuda_without_a_gpu_says_so():
    if torch.cuda.is_available():
        hw = detect("cuda")
        assert hw.kind == "cuda" and hw.cuda_capability == torch.cuda.get_device_capability()
    else:
        with pytest.raises(ConfigError, match="no usable CUDA"):
            detect("cuda")


def test_fp16_amp_asked_on_a_cpu_reports_the_bf16_mixed_that_lightning_runs(monkeypatch, tmp_path):
    res = resolve_precision("16-mixed", AVX2)
    assert res.value == "16-mixed" and res.ran == "bf16-mixed"  # the value (and the cache key) stays
    assert "training ran bf16-mixed" in res.reason and "honoured" not in res.reason
    assert resolve_precision("16-mixed", SM75).ran is None  # CUDA runs fp16 AMP as asked
    from prunelab import hardware
    from prunelab.compose import compose
    from prunelab.resolve import resolve_auto

    monkeypatch.setattr(hardware, "detect", lambda device: AVX2)
    cfg = compose(["+experiment=smoke", "trainer.precision=16-mixed", "trainer.accelerator=cpu"], tmp_path)
    rec = resolve_auto(cfg)
    assert rec["trainer.precision"]["ran"] == "bf16-mixed" and cfg.trainer.precision == "16-mixed"
    assert rec["latency.dtype"]["reason"].startswith("auto: ")


def test_a_deploy_dtype_left_auto_is_reported_as_auto(monkeypatch, tmp_path):
    """The run's spec is resolved before the concrete values are written back into the config, so the
    reason the timing reports (the spec's) still says auto, though the saved config shows the dtype."""
    from prunelab import hardware
    from prunelab.compose import compose
    from prunelab.deploy.timing import build_forms
    from prunelab.resolve import resolve_run

    monkeypatch.setattr(hardware, "detect", lambda device: AVX2)
    cfg = compose(["+experiment=smoke", "trainer.accelerator=cpu", "latency.runtime=eager"], tmp_path)
    _, spec = resolve_run(cfg)
    assert cfg.latency.dtype != "auto" and spec.reasons["dtype"].startswith("auto: ")
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    _, facts, _ = build_forms({"dense": net}, set(), {2: torch.zeros(2, 3, 2, 2)}, 2, torch.device("cpu"),
                              spec.with_runtime("deploy"), None)
    assert facts["dtype_reason"] == spec.reasons["dtype"]
