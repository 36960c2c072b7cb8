"""`auto` settings in a composed config follow the (faked) hardware, and "fast" is never slower."""

from __future__ import annotations

import pytest

from conftest import compose_cfg
from prunelab import hardware, resolve
from prunelab.errors import ConfigError

AVX2 = hardware.Hardware("cpu", "AMD EPYC", "AVX2", frozenset({"avx2"}))
AVX512 = hardware.Hardware("cpu", "AMD EPYC", "AVX512", frozenset({"avx2", "avx512f"}))
AMX = hardware.Hardware("cpu", "Xeon", "AVX512", frozenset({"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}))
T4 = hardware.Hardware("cuda", "Tesla T4", cuda_capability=(7, 5))
H100 = hardware.Hardware("cuda", "H100", cuda_capability=(9, 0))

FAST = ["+experiment=[smoke,fast]"]


@pytest.mark.parametrize("hw,precision,channels_last,compile_", [
    (AVX2, "32-true", False, False),
    (AVX512, "32-true", True, False),
    (AMX, "bf16-mixed", True, False),
    (T4, "16-mixed", True, True),
    (H100, "bf16-mixed", True, True),
])
def test_fast_experiment_resolves_per_hardware(tmp_path, monkeypatch, hw, precision, channels_last, compile_):
    monkeypatch.setattr(hardware, "detect", lambda device="cpu": hw)
    cfg = compose_cfg(tmp_path, FAST)
    assert cfg.trainer.precision == "auto" and cfg.model.channels_last == "auto"
    record = resolve.resolve_auto(cfg)
    assert (cfg.trainer.precision, cfg.model.channels_last, cfg.model.compile) == (precision, channels_last, compile_)
    assert record["trainer.precision"]["requested"] == "auto"
    assert record["trainer.precision"]["value"] == precision
    assert hw.describe() in record["trainer.precision"]["reason"]


def test_explicit_bf16_on_an_emulating_cpu_is_honoured_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(hardware, "detect", lambda device="cpu": AVX2)
    cfg = compose_cfg(tmp_path, ["+experiment=smoke", "trainer.precision=bf16-mixed"])
    with pytest.warns(UserWarning, match="emulated"):
        record = resolve.resolve_auto(cfg)
    assert cfg.trainer.precision == "bf16-mixed"
    assert "emulated" in record["trainer.precision"]["warning"]


def test_defaults_are_left_as_they_are(tmp_path, monkeypatch):
    monkeypatch.setattr(hardware, "detect", lambda device="cpu": AMX)
    cfg = compose_cfg(tmp_path, ["+experiment=smoke"])
    resolve.resolve_auto(cfg)
    assert (cfg.trainer.precision, cfg.model.channels_last, cfg.model.compile) == ("32-true", False, False)


def test_gpu_accelerator_without_a_gpu_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(resolve.torch.cuda, "is_available", lambda: False)
    cfg = compose_cfg(tmp_path, ["+experiment=smoke", "trainer.accelerator=gpu"])
    with pytest.raises(ConfigError, match="trainer.accelerator=gpu"):
        resolve.resolve_auto(cfg)


def test_this_machine_never_resolves_to_emulated_bf16(tmp_path):
    cfg = compose_cfg(tmp_path, FAST)
    resolve.resolve_auto(cfg)
    hw = hardware.detect("cpu")
    assert (cfg.trainer.precision == "bf16-mixed") == hw.native_bf16
