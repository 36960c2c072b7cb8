"""The fine-tune stage: train, or reuse a model fine-tuned before under the same config.

Reuse is keyed by a hash of everything that shapes the trained weights (data, model, the
trainer's training settings, seed), so every job of a ratio multirun shares one fine-tune. A file
lock around the cache entry makes concurrent jobs (joblib, submitit) train exactly once: the first
job trains while the others wait, then load its weights. A weights file that cannot be loaded (an
explicit ``weights_path`` or a corrupt cache entry) stops the run with one line before any training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from lightning import LightningDataModule, LightningModule, Trainer
from omegaconf import DictConfig, OmegaConf

from prunelab.errors import ConfigError, WeightsFileError
from prunelab.io import load_state_dict, save_state_dict, write_json

log = logging.getLogger(__name__)

# Trainer keys that change what the weights become; the rest (logging, progress, eval limits) do not.
_TRAINING_KEYS = ("max_epochs", "max_steps", "limit_train_batches", "precision", "accumulate_grad_batches",
                  "gradient_clip_val", "strategy", "devices", "num_nodes")
_DATA_IGNORED = ("num_workers", "eval_batch_size", "pin_memory", "_target_")


@dataclass
class FinetuneResult:
    reused: bool
    source: str
    seconds: float
    key: str

    def to_dict(self) -> dict:
        return {"reused": self.reused, "source": self.source, "key": self.key}


def training_key(cfg: DictConfig) -> str:
    """A short hash of the training-relevant config; equal configs share a fine-tune."""
    data = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k not in _DATA_IGNORED}
    data["kind"] = cfg.data._target_
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    payload = {
        "data": data,
        "model": {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items()
                  if k not in ("compile", "fused_optimizer")},
        "trainer": {k: trainer.get(k) for k in _TRAINING_KEYS},
        "seed": cfg.seed,
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def weights_path_error(exc: WeightsFileError, model: DictConfig) -> ConfigError:
    """One line for an unusable ``finetune.weights_path`` (shared with the pre-flight check)."""
    key = f"finetune.weights_path={exc.path}"
    if exc.mismatch:
        return ConfigError(f"{key} is not a state_dict of model.arch={model.get('arch')} with "
                           f"model.num_classes={model.get('num_classes')}: {exc.problem}")
    advice = "" if "dense.pt" in exc.problem or "ckpt_path" in exc.problem else "; point it at a run's models/dense.pt"
    return ConfigError(f"{key} {exc.problem}{advice}")


def cache_entry_error(exc: WeightsFileError, entry: Path) -> ConfigError:
    """One line for a cached fine-tune that cannot be loaded: every rerun would hit it again."""
    return ConfigError(f"the cached fine-tune {exc.path} {exc.problem}; delete the cache entry {entry} "
                       "(or set finetune.cache=false) and rerun")


def _model_shapes(model: DictConfig) -> dict[str, torch.Size] | None:
    """Parameter and buffer shapes of the configured network, built on the meta device (no memory,
    no download); None for a model class other than prunelab's."""
    if model.get("_target_") != "prunelab.models.ImageClassifier":
        return None
    from prunelab.models.factory import build_classifier

    with torch.device("meta"):
        net = build_classifier(model.arch, None, model.num_classes)
    return {k: v.shape for k, v in net.state_dict().items()}


def check_start_weights(cfg: DictConfig) -> None:
    """Pre-flight (``config_check``): the weights the fine-tune starts from load and fit the model,
    an explicit ``weights_path`` or a cached fine-tune a rerun would reuse (a corrupt one would fail
    every rerun). Mapped, not read: a check of a 500 MB file costs next to nothing."""
    ft = cfg.finetune
    if ft.get("weights_path"):
        path, error = Path(ft.weights_path).expanduser(), lambda exc: weights_path_error(exc, cfg.model)
    elif ft.get("cache") and not cfg.get("ckpt_path"):
        entry = Path(ft.cache_dir) / training_key(cfg)
        path, error = entry / "dense.pt", lambda exc: cache_entry_error(exc, entry)
        if not (path.exists() or path.is_symlink()):
            return  # nothing cached yet: this run trains
    else:
        return
    try:
        load_state_dict(path, _model_shapes(cfg.model), mmap=True)
    except WeightsFileError as exc:
        raise error(exc) from None


def _load_into(module: LightningModule, path: Path, error: Callable[[WeightsFileError], ConfigError]) -> None:
    expected = {k: v.shape for k, v in module.net.state_dict().items()}
    try:
        state = load_state_dict(path, expected)
    except WeightsFileError as exc:
        raise error(exc) from None
    module.net.load_state_dict(state, strict=True)


def finetune(cfg: DictConfig, trainer: Trainer, module: LightningModule, dm: LightningDataModule) -> FinetuneResult:
    t0 = time.perf_counter()
    key = training_key(cfg)
    ft = cfg.finetune
    if ft.weights_path:
        path = Path(ft.weights_path).expanduser()
        _load_into(module, path, lambda exc: weights_path_error(exc, cfg.model))
        return FinetuneResult(True, str(path), time.perf_counter() - t0, key)

    if not ft.cache or cfg.ckpt_path:
        trainer.fit(module, datamodule=dm, ckpt_path=cfg.ckpt_path)
        return FinetuneResult(False, "trained", time.perf_counter() - t0, key)

    entry = Path(ft.cache_dir) / key
    entry.parent.mkdir(parents=True, exist_ok=True)
    weights = entry / "dense.pt"
    if trainer.global_rank > 0:
        # A DDP worker starts inside rank zero's fit (or its launch for a reused model), while
        # rank zero holds the lock: it must follow rank zero's decision without taking the lock.
        if weights.is_file():
            _load_into(module, weights, lambda exc: cache_entry_error(exc, entry))
            return FinetuneResult(True, str(weights), time.perf_counter() - t0, key)
        trainer.fit(module, datamodule=dm)
        return FinetuneResult(False, "trained", time.perf_counter() - t0, key)
    lock = FileLock(str(entry) + ".lock")
    with lock:
        cached = weights.is_file()
        if cached:
            log.info("reusing fine-tuned weights %s", weights)
            _load_into(module, weights, lambda exc: cache_entry_error(exc, entry))
            return FinetuneResult(True, str(weights), time.perf_counter() - t0, key)
        trainer.fit(module, datamodule=dm)
        if trainer.is_global_zero:
            save_state_dict(weights, module.net.state_dict())
            write_json(entry / "config.json", {"key": key, "config": OmegaConf.to_container(cfg, resolve=False)})
    return FinetuneResult(False, "trained", time.perf_counter() - t0, key)
