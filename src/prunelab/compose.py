"""Compose the app's config outside ``python -m prunelab.train``: tests, benchmarks, notebooks.

The same ``train.yaml`` and overrides as the command line, with every path under one folder and
Hydra's runtime set, so ``pipeline.run(cfg)`` behaves as in a real run.
"""

from __future__ import annotations

from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

CONF_DIR = Path(__file__).resolve().parent / "conf"


def compose(overrides: list[str], root: str | Path, output_dir: str | Path | None = None) -> DictConfig:
    """``train.yaml`` with ``overrides``; logs and caches under ``root``, results in ``output_dir``
    (default ``root/run``)."""
    root = Path(root)
    out = Path(output_dir) if output_dir is not None else root / "run"
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = hydra_compose("train", overrides=list(overrides), return_hydra_config=True)
        with open_dict(cfg):
            cfg.paths.root_dir = str(root)
            cfg.paths.output_dir = str(out)
            cfg.paths.log_dir = str(root / "logs")
            cfg.hydra.runtime.output_dir = str(out)
            cfg.hydra.job.num = 0
        HydraConfig().set_config(cfg)
    return cfg
