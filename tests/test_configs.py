"""Every experiment composes; the CLI's --help and --cfg job work; bad values stop early."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import CONF_DIR, compose_cfg
from prunelab import config_check
from prunelab.errors import ConfigError

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def test_experiments_exist():
    assert {"smoke", "sweep"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_resolves(tmp_path, name):
    cfg = compose_cfg(tmp_path, [f"+experiment={name}"])
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    config_check.check(cfg)
    assert cfg.data._target_ and cfg.model._target_ and cfg.trainer._target_


def test_default_groups_present(tmp_path):
    cfg = compose_cfg(tmp_path, [])
    for group in ("data", "model", "trainer", "callbacks", "logger", "paths", "prune", "search", "latency"):
        assert group in cfg, group
    assert cfg.model.arch == "vgg16" and cfg.model.weights == "IMAGENET1K_V1"
    assert cfg.data.batch_size == 128 and cfg.seed == 42 and cfg.trainer.max_epochs == 10
    assert (cfg.model.lr, cfg.model.momentum, cfg.model.weight_decay) == (0.01, 0.9, 5e-4)


def test_experiment_not_in_defaults():
    # `+experiment=x` fails with "Multiple values" if the group sits in the defaults list.
    defaults = OmegaConf.load(CONF_DIR / "train.yaml").defaults
    assert not any("experiment" in str(d) for d in defaults)


@pytest.mark.parametrize(
    "override, key",
    [
        ("prune.ratio=1.0", "prune.ratio"),
        ("prune.ratio=-0.1", "prune.ratio"),
        ("search.tolerance=-1", "search.tolerance"),
        ("prune.scope=diagonal", "prune.scope"),
        ("search.rule=best", "search.rule"),
        ("prune.method=random", "prune.method"),
        ("search.grid=[0.2,1.5]", "search.grid"),
    ],
)
def test_bad_values_raise_config_error_naming_the_key(tmp_path, override, key):
    cfg = compose_cfg(tmp_path, ["+experiment=smoke", override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_check.check(cfg)


def test_cli_help_and_cfg_job(run_cli):
    r = run_cli(options=("--help",))
    assert r.returncode == 0 and "experiment" in r.stdout and "prune" in r.stdout
    r = run_cli("+experiment=smoke", options=("--cfg", "job"))
    assert r.returncode == 0, r.stderr
    assert "SyntheticDataModule" in r.stdout and "task_name: smoke" in r.stdout


@pytest.mark.parametrize("override", ["prune.ratio=1.2", "search.tolerance=-1", "prune.scope=nope", "search.rule=x"])
def test_cli_bad_value_one_message_nonzero_exit(run_cli, tmp_path, override):
    r = run_cli("+experiment=smoke", override)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert override.split("=")[0] in r.stderr
    assert not list(Path(tmp_path / "logs").rglob("report.json"))
