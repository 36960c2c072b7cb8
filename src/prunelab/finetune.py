"""The fine-tune stage: train, or reuse a model fine-tuned before under the same config.

Reuse is keyed by a hash of everything that shapes the trained weights (data, model, the
trainer's training settings, seed), so every job of a ratio multirun shares one fine-tune. A file
lock around the cache entry makes concurrent jobs (joblib, submitit) train exactly once: the first
job trains while the others wait, then load its weights. A weights file that cannot be loaded (an
explicit ``weights_path`` or a corrupt cache entry) stops the run with one line before any training.

Resuming (``ckpt_path``) gives the weights an uninterrupted fine-tune would have (the loaders'
order and augmentation and, via ``callbacks.checkpoint.ResumeState``, dropout are functions of where training
is, not of the RNG's history), so a resumed fine-tune is cached like any other when its checkpoint
came from the same training (same key, or the same but shorter run). ``ckpt_path=auto`` resumes the
most advanced complete checkpoint of the same training key in the run's checkpoint folder or any
run folder of the task under ``paths.log_dir``; with none, training starts from the beginning.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from lightning import LightningDataModule, LightningModule, Trainer
from omegaconf import DictConfig, OmegaConf

from prunelab.callbacks.checkpoint import ResumeState, find_resume_checkpoint, read_checkpoint
from prunelab.data import data_identity
from prunelab.errors import ConfigError, WeightsFileError
from prunelab.io import load_state_dict, save_state_dict, write_json
from prunelab.models.factory import weights_file_identity

log = logging.getLogger(__name__)

# Trainer keys that change what the weights become; the rest (logging, progress, eval limits) do not.
_TRAINING_KEYS = ("max_epochs", "max_steps", "limit_train_batches", "precision", "accumulate_grad_batches",
                  "gradient_clip_val", "strategy", "devices", "num_nodes")
# How long a run trains: the first epochs of a longer run are those of a shorter one (no schedule
# depends on the length), so a checkpoint of the shorter run is a valid start for the longer one.
_LENGTH_KEYS = ("max_epochs", "max_steps")
_DATA_IGNORED = ("num_workers", "eval_batch_size", "pin_memory", "_target_")
# The training stream's version, part of every key: bumped when the same config trains to other
# weights (2: order, augmentation and dropout seeded from (seed, epoch[, batch])), so a fine-tune
# cached by older code is not reused as if this code had trained it.
_STREAM = 2


@dataclass
class FinetuneResult:
    reused: bool
    source: str
    seconds: float
    key: str
    # The cache file holding exactly these weights (reused, or cached by this fit): the run's
    # models/dense.pt is stored as the same file, not a second copy.
    cached: str | None = None

    def to_dict(self) -> dict:
        return {"reused": self.reused, "source": self.source, "key": self.key}


def _key(cfg: DictConfig, trainer_keys: tuple[str, ...]) -> str:
    data = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k not in _DATA_IGNORED}
    data["kind"] = cfg.data._target_
    # what the files hold, not where they are: a changed image is another fine-tune, the same images
    # copied elsewhere (another path, new modification times) the same one
    content = data_identity(cfg.data)
    if content is not None:
        data["identity"] = content
        data.pop("root", None)
    data.pop("cache_dir", None)  # where decoded arrays are kept changes nothing they hold
    if not data.get("cutout") or data.get("augment") is False:  # off (or unused: no augmentation), as
        data.pop("cutout", None)  # before the setting existed: earlier fine-tunes keep their keys
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    model = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items()
             if k not in ("compile", "compile_mode", "fused_optimizer")}
    start = weights_file_identity(model.get("weights"))
    if start is not None:  # training starts from a file: a rewritten file is another training
        model["weights_identity"] = start
    payload = {
        "data": data,
        "model": model,
        "trainer": {k: trainer.get(k) for k in trainer_keys},
        "seed": cfg.seed,
        "stream": _STREAM,
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def training_key(cfg: DictConfig) -> str:
    """A short hash of the training-relevant config; equal configs share a fine-tune."""
    return _key(cfg, _TRAINING_KEYS)


def lineage_key(cfg: DictConfig) -> str:
    """``training_key`` without the run's length: runs that differ only in how long they train. A
    learning-rate schedule that depends on the length (cosine) keeps it: a shorter run's epochs are
    not those of a longer one there."""
    if (cfg.model.get("schedule") or "constant") != "constant":
        return training_key(cfg)
    return _key(cfg, tuple(k for k in _TRAINING_KEYS if k not in _LENGTH_KEYS))


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
    elif ft.get("cache") and cfg.get("ckpt_path") in (None, "", "auto"):  # a run that may reuse the cache
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


def _resume_state(trainer: Trainer, cfg: DictConfig, key: str) -> None:
    """Add ``ResumeState`` (per-batch seeds, checkpoint stamps) to this trainer, once."""
    if not any(isinstance(cb, ResumeState) for cb in trainer.callbacks):
        trainer.callbacks.insert(0, ResumeState(cfg.seed, key, lineage_key(cfg)))


def resolve_ckpt_path(cfg: DictConfig, trainer: Trainer, key: str) -> str | None:
    """``cfg.ckpt_path`` with ``auto`` resolved: the most advanced complete checkpoint stamped with
    this training key in the trainer's checkpoint folders or any run folder of the task under
    ``paths.log_dir``; None (train from the start) when there is none."""
    ckpt = cfg.get("ckpt_path")
    if ckpt != "auto":
        return None if not ckpt else str(Path(ckpt).expanduser())
    folders = [cb.dirpath for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
    log_dir = cfg.get("paths", {}).get("log_dir")
    if log_dir:
        folders.append(Path(log_dir) / str(cfg.get("task_name", "")))
    found = find_resume_checkpoint(folders, key)
    if found is None:
        log.info("ckpt_path=auto: no complete checkpoint of this training (key %s) under %s; training from "
                 "the start", key, ", ".join(map(str, folders)) or "no folder")
        return None
    path, meta = found
    log.info("ckpt_path=auto: resuming from %s (epoch %s, step %s)", path, meta["epoch"], meta["global_step"])
    return str(path)


def _cacheable(ckpt: str | None, cfg: DictConfig, key: str) -> bool:
    """Whether a fit resumed from ``ckpt`` ends with exactly this config's fine-tune: the checkpoint
    was written by this training, or by the same training set to run shorter (and it has not
    trained past where this run ends, nor carries a schedule that depends on the length)."""
    if ckpt is None:
        return True
    meta = read_checkpoint(ckpt)
    why = None
    if meta is None:
        why = "it cannot be read back"
    elif meta["training_key"] == key:
        return True
    elif meta["training_key"] is None:
        why = "it carries no training key (written before prunelab stamped checkpoints)"
    elif meta["lineage"] != lineage_key(cfg):
        why = "it was written by a different training config"
    elif meta["lr_schedulers"]:
        why = "it carries a learning-rate schedule, which may depend on the run's length"
    else:
        max_epochs, max_steps = cfg.trainer.get("max_epochs"), cfg.trainer.get("max_steps")
        if max_epochs not in (None, -1) and meta["epoch"] is not None and meta["epoch"] >= max_epochs:
            why = f"it is at epoch {meta['epoch']}, past this run's trainer.max_epochs={max_epochs}"
        elif max_steps not in (None, -1) and meta["global_step"] > max_steps:
            why = f"it is at step {meta['global_step']}, past this run's trainer.max_steps={max_steps}"
        else:
            return True
    log.info("not caching the fine-tune resumed from %s: %s", ckpt, why)
    return False


def _remove_stale_writes(entry: Path) -> None:
    """Temporary files of a cache write killed midway (``io``'s ``.NAME.XXXX.tmp``); called under the
    entry's lock, which every writer of the entry holds, so none is being written."""
    if entry.is_dir():
        for tmp in entry.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def finetune(cfg: DictConfig, trainer: Trainer, module: LightningModule, dm: LightningDataModule) -> FinetuneResult:
    t0 = time.perf_counter()
    key = training_key(cfg)
    ft = cfg.finetune
    if ft.weights_path:
        path = Path(ft.weights_path).expanduser()
        _load_into(module, path, lambda exc: weights_path_error(exc, cfg.model))
        return FinetuneResult(True, str(path), time.perf_counter() - t0, key)

    _resume_state(trainer, cfg, key)
    # An explicit checkpoint is resumed even when the cache holds this config's weights: the user
    # asked for that start. ``auto`` and null take the cache first.
    explicit = bool(cfg.get("ckpt_path")) and cfg.ckpt_path != "auto"
    if not ft.cache:
        ckpt = resolve_ckpt_path(cfg, trainer, key)
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
        return FinetuneResult(False, _trained(ckpt), time.perf_counter() - t0, key)

    entry = Path(ft.cache_dir) / key
    entry.parent.mkdir(parents=True, exist_ok=True)
    weights = entry / "dense.pt"
    if trainer.global_rank > 0:
        # A DDP worker starts inside rank zero's fit (or its launch for a reused model), while
        # rank zero holds the lock: it must follow rank zero's decision without taking the lock.
        if weights.is_file() and not explicit:
            _load_into(module, weights, lambda exc: cache_entry_error(exc, entry))
            return FinetuneResult(True, str(weights), time.perf_counter() - t0, key)
        ckpt = resolve_ckpt_path(cfg, trainer, key)
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
        return FinetuneResult(False, _trained(ckpt), time.perf_counter() - t0, key)
    lock = FileLock(str(entry) + ".lock")
    with lock:
        _remove_stale_writes(entry)
        cached = weights.is_file()
        if cached and not explicit:
            log.info("reusing fine-tuned weights %s", weights)
            _load_into(module, weights, lambda exc: cache_entry_error(exc, entry))
            return FinetuneResult(True, str(weights), time.perf_counter() - t0, key, cached=str(weights))
        # Resolved under the lock, which every job training this key holds: no checkpoint of this key
        # is being written while one is chosen (and its stale temporary files can go).
        ckpt = resolve_ckpt_path(cfg, trainer, key)
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
        stored = None
        if trainer.is_global_zero and not cached and _cacheable(ckpt, cfg, key):
            save_state_dict(weights, module.net.state_dict())
            write_json(entry / "config.json", {"key": key, "config": OmegaConf.to_container(cfg, resolve=False),
                                               "resumed_from": ckpt})
            stored = str(weights)
            if not ft.get("keep_checkpoint"):
                drop_run_checkpoints(trainer, key, weights)
    return FinetuneResult(False, _trained(ckpt), time.perf_counter() - t0, key, cached=stored)


def drop_run_checkpoints(trainer: Trainer, key: str, cached: Path) -> list[Path]:
    """Delete this run's checkpoints of training ``key`` once its completed fine-tune is cached.

    A checkpoint is what resumes an interrupted fine-tune (``ckpt_path=auto``); a completed one is
    served from the cache instead, so its ~1 GB checkpoint (weights and SGD momentum) would only
    double the disk a run takes. Only the checkpoint folders of this fit's own callbacks are
    touched, ``last.ckpt`` first (a kill between the two leaves a dangling link, which nothing
    resumes from, never a link to a half-deleted file), and only files stamped with ``key``.
    An interrupted fit never reaches here: its checkpoints stay where ``auto`` finds them."""
    removed: list[Path] = []
    for cb in trainer.checkpoint_callbacks:
        folder = Path(cb.dirpath) if getattr(cb, "dirpath", None) else None
        if folder is None or not folder.is_dir():
            continue
        links = [p for p in folder.glob("*.ckpt") if p.is_symlink()]
        files = [p for p in folder.glob("*.ckpt") if not p.is_symlink() and p.is_file()]
        ours = [p for p in files if (read_checkpoint(p) or {}).get("training_key") == key]
        for link in links:
            target = os.path.realpath(link)
            if not os.path.exists(target) or Path(target) in {p.resolve() for p in ours}:
                link.unlink(missing_ok=True)
                removed.append(link)
        for path in ours:
            path.unlink(missing_ok=True)
            removed.append(path)
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when nothing else is in it
    if removed:
        log.info("the fine-tune is cached at %s: removed its checkpoint(s) %s (finetune.keep_checkpoint=true "
                 "keeps them)", cached, ", ".join(p.name for p in removed))
    return removed


def _trained(ckpt: str | None) -> str:
    return "trained" if ckpt is None else f"trained, resumed from {ckpt}"
