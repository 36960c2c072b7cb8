"""The fine-tune stage: train, or reuse a model fine-tuned before under the same config.

Reuse is keyed by a hash of everything that shapes the trained weights (data, model, the
trainer's training settings, seed), so every job of a ratio multirun shares one fine-tune. A file
lock around the cache entry makes concurrent jobs (joblib, submitit) train exactly once: the first
job trains while the others wait, then load its weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock
from lightning import LightningDataModule, LightningModule, Trainer
from omegaconf import DictConfig, OmegaConf

from prunelab.errors import ConfigError
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


def _load_into(module: LightningModule, path: Path) -> None:
    try:
        state = load_state_dict(path)
        module.net.load_state_dict(state, strict=True)
    except (RuntimeError, OSError, KeyError) as exc:
        raise ConfigError(f"cannot load fine-tuned weights from {path}: {exc}".splitlines()[0]) from None


def finetune(cfg: DictConfig, trainer: Trainer, module: LightningModule, dm: LightningDataModule) -> FinetuneResult:
    t0 = time.perf_counter()
    key = training_key(cfg)
    ft = cfg.finetune
    if ft.weights_path:
        path = Path(ft.weights_path).expanduser()
        if not path.is_file():
            raise ConfigError(f"finetune.weights_path={path} does not exist; point it at a models/dense.pt")
        _load_into(module, path)
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
            _load_into(module, weights)
            return FinetuneResult(True, str(weights), time.perf_counter() - t0, key)
        trainer.fit(module, datamodule=dm)
        return FinetuneResult(False, "trained", time.perf_counter() - t0, key)
    lock = FileLock(str(entry) + ".lock")
    with lock:
        cached = weights.is_file()
        if cached:
            log.info("reusing fine-tuned weights %s", weights)
            _load_into(module, weights)
            return FinetuneResult(True, str(weights), time.perf_counter() - t0, key)
        trainer.fit(module, datamodule=dm)
        if trainer.is_global_zero:
            save_state_dict(weights, module.net.state_dict())
            write_json(entry / "config.json", {"key": key, "config": OmegaConf.to_container(cfg, resolve=False)})
    return FinetuneResult(False, "trained", time.perf_counter() - t0, key)
