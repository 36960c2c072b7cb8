"""The one Trainer builder: the run's fine-tune and every recovery fine-tune are built here from
``cfg.trainer`` (plus the callbacks and loggers groups), so they share accelerator, precision
and limits; a recovery passes its own overrides (epochs, no checkpoints, no logger)."""

from __future__ import annotations

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning import Trainer
from omegaconf import DictConfig, OmegaConf

from prunelab.errors import ConfigError, PrunelabError


def build(node: DictConfig, what: str):
    """``instantiate(node)``, with a bad value in it reported as one line naming ``what``."""
    try:
        return instantiate(node)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, PrunelabError):
            raise cause from None
        if isinstance(cause, ValueError | TypeError):
            raise ConfigError(f"{what}: {cause}") from None
        raise


def build_trainer(cfg: DictConfig, callbacks: list | None = None, with_config_callbacks: bool = True,
                  **overrides) -> Trainer:
    """A Lightning Trainer from ``cfg.trainer``; ``overrides`` replace its keys (e.g. ``max_epochs``,
    ``logger=False``); ``callbacks`` are added to the config's (or replace them when
    ``with_config_callbacks`` is false)."""
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    target = trainer_cfg.pop("_target_", "lightning.pytorch.Trainer")
    if not str(target).endswith("Trainer"):
        raise ConfigError(f"trainer._target_={target} is not a Lightning Trainer")
    configured = [build(c, "callbacks") for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c] \
        if with_config_callbacks else []
    loggers = [] if "logger" in overrides else \
        [build(c, "logger") for c in (cfg.get("logger") or {}).values() if c and "_target_" in c]
    trainer_cfg.update(callbacks=configured + list(callbacks or []), logger=loggers or False)
    trainer_cfg.update(overrides)
    return Trainer(**trainer_cfg)
