"""The prune, search and latency groups: each read through one frozen spec built where it is checked;
a retired key is refused with what to use instead."""

from __future__ import annotations

import dataclasses

import pytest
from omegaconf import OmegaConf, open_dict

from conftest import CONF_DIR, compose_cfg
from prunelab import config_check
from prunelab.errors import ConfigError
from prunelab.pruning.spec import PruneSpec, prune_spec
from prunelab.search.pareto import OBJECTIVES
from prunelab.search.spec import SearchSpec, search_spec


def test_specs_hold_the_composed_values(tmp_path):
    cfg = compose_cfg(tmp_path, ["prune=channel", "prune.ratio=0.3", "prune.schedule=iterative", "model.lr=0.02",
                                 "search.grid=[0.1,0.4]", "search.objective=macs", "search.confidence=0.9"])
    p, s = prune_spec(cfg), search_spec(cfg)
    assert (p.method, p.ratio, p.iterative, p.searches, p.recover_lr) == ("channel", 0.3, True, False, 0.02)
    assert (s.grid, s.objective, s.across_methods, s.confidence) == ((0.1, 0.4), "macs", True, 0.9)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.ratio = 0.5  # type: ignore[misc]


def test_keys_a_partial_config_leaves_out_take_the_option_files_defaults():
    """The defaults are the config files' (no second copy in code), ``${model.lr}`` read from the config."""
    cfg = OmegaConf.create({"model": {"lr": 0.07}, "prune": {"method": "channel"}, "search": {"tolerance": 2.0}})
    p, s = prune_spec(cfg), search_spec(cfg)
    magnitude = OmegaConf.load(CONF_DIR / "prune" / "magnitude.yaml")
    assert p == PruneSpec(method="channel", ratio=None, scope=magnitude.scope, schedule=magnitude.schedule,
                          steps=magnitude.steps, recover_epochs=(magnitude.recover_epochs,), recover_lr=0.07,
                          recover_schedule=magnitude.recover_schedule, options=p.options)
    assert dict(p.options) == dict(OmegaConf.load(CONF_DIR / "prune" / "options" / "channel.yaml"))
    search = OmegaConf.load(CONF_DIR / "search" / "default.yaml")
    assert s.tolerance == 2.0 and list(s.grid) == list(search.grid) and s.final_round == search.final_round


@pytest.mark.parametrize("override, message", [
    ("prune.steps=0", "prune.steps=0 must be an integer >= 1"),
    ("prune.round_to=0", "prune.round_to=0 must be an integer >= 1"),
    ("search.tolerance=-1", "search.tolerance=-1 must be a number >= 0"),
    ("search.methods=[magnitude,magnitude]", "search.methods lists magnitude more than once"),
])
def test_the_spec_and_the_config_check_refuse_alike(tmp_path, override, message):
    """The check lives beside the spec: building it and checking the config say the same one line."""
    cfg = compose_cfg(tmp_path, [override])
    build = prune_spec if override.startswith("prune") else search_spec
    for refuse in (build, config_check.check_values):
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
            refuse(cfg)


def test_objectives_are_defined_once(tmp_path):
    assert not hasattr(config_check, "OBJECTIVES")
    for objective in OBJECTIVES:
        assert search_spec(compose_cfg(tmp_path, [f"search.objective={objective}"])).objective == objective
    assert set(SearchSpec.__dataclass_fields__) == set(OmegaConf.load(CONF_DIR / "search" / "default.yaml"))


def test_latency_onnx_is_refused_with_what_to_use(tmp_path):
    cfg = compose_cfg(tmp_path, ["+latency.onnx=true"])
    with pytest.raises(ConfigError) as err:
        config_check.check_values(cfg)
    text = str(err.value)
    assert "latency.runtime=onnxruntime" in text and "python -m prunelab.export" in text and "\n" not in text
    assert "onnx" not in OmegaConf.load(CONF_DIR / "latency" / "default.yaml")


def test_a_saved_config_with_latency_onnx_is_refused_too(tmp_path):
    cfg = compose_cfg(tmp_path, [])
    with open_dict(cfg):
        cfg.latency.onnx = False  # an older run's config: the key alone is refused, whatever its value
    with pytest.raises(ConfigError, match="latency.runtime=onnxruntime"):
        config_check.check_values(cfg)


def test_the_command_refuses_latency_onnx_in_one_line(run_cli):
    r = run_cli("latency.onnx=true")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "latency.runtime=onnxruntime" in lines[0], r.stderr


KERNEL_KEYS = ("winograd", "pack")  # prunelab's own float32 CPU kernels' switches, removed with them


@pytest.mark.parametrize("key", KERNEL_KEYS)
def test_latency_kernel_switches_are_refused_with_what_to_use(tmp_path, key):
    assert key not in OmegaConf.load(CONF_DIR / "latency" / "default.yaml")
    for override in (f"+latency.{key}=true", f"++latency.{key}=auto"):
        with pytest.raises(ConfigError) as err:
            config_check.check_values(compose_cfg(tmp_path, [override]))
        text = str(err.value)
        assert text.startswith(f"latency.{key} is no longer a setting") and "\n" not in text
        assert "library runtimes serve faster" in text and "latency.runtime=auto" in text
    cfg = compose_cfg(tmp_path, [])
    with open_dict(cfg):
        cfg.latency[key] = False  # an older run's config: the key alone is refused, whatever its value
    with pytest.raises(ConfigError, match=f"latency.{key} is no longer a setting"):
        config_check.check_values(cfg)


@pytest.mark.parametrize("key", KERNEL_KEYS)
def test_the_latency_callback_refuses_kernel_switches_with_the_same_advice(key):
    from prunelab.callbacks import LatencyCallback

    with pytest.raises(ConfigError, match=f"latency.{key} is no longer a setting.*latency.runtime=auto"):
        LatencyCallback(**{key: True})


@pytest.mark.parametrize("override", ["latency.winograd=true", "++latency.pack=auto"])
def test_the_command_refuses_latency_kernel_switches_in_one_line(run_cli, override):
    r = run_cli(override)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    key = override.lstrip("+").split("=")[0]
    assert len(lines) == 1 and lines[0].endswith(f"{key} is no longer a setting: prunelab's own float32 kernels "
                                                 "were removed because library runtimes serve faster; use "
                                                 "latency.runtime=auto (or openvino/inductor)"), r.stderr
