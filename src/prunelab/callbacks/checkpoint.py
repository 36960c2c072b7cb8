"""The fine-tune's checkpoint callbacks (the ``callbacks`` config group builds ``AtomicCheckpoint``):
checkpoints that a kill cannot break, and a resumed fine-tune equal to an uninterrupted one.

- ``AtomicCheckpoint``, the ``ModelCheckpoint`` of ``conf/callbacks``: at most one checkpoint per
  ``min_interval_s`` of training (always one at the last epoch), so short GPU epochs do not each
  pay for a 1 GB write; a checkpoint appears under its name only complete (written to a temporary name beside it, then renamed), ``last.ckpt`` is
  re-pointed by one rename, and a superseded checkpoint is deleted only after ``last.ckpt`` points
  past it. Lightning's own order (save, delete the old file, then re-link) left ``last.ckpt``
  dangling for a moment at every epoch; its writes went through a temporary file in the system
  temp folder, copied over when that is another file system, and left behind there by a kill.
- ``ResumeState``: seeds torch, numpy and random before every training batch from (seed, epoch,
  batch), so dropout draws depend on where training is, not on the RNG's history (a resumed run's
  history starts at the resume); it stamps each checkpoint with the training key that made it.
- ``find_resume_checkpoint``: what ``ckpt_path=auto`` resumes: the most advanced complete
  checkpoint of the same training key.

The data side (order and augmentation per epoch) lives with the loaders, ``prunelab.data``.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import socket
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from weakref import proxy

import numpy as np
import torch
from lightning import Callback, LightningModule, Trainer
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import Strategy

from prunelab.fit_progress import final_epoch
from prunelab.io import _atomic

log = logging.getLogger(__name__)

STAMP = "prunelab"  # the checkpoint's top-level key for ResumeState's stamp
_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40] or "host"
# .NAME.ckpt.HOST.PID.tmp: whether its writer still runs can be told for files of this host
_TMP = re.compile(rf"^\.(?P<name>.+\.ckpt)\.{re.escape(_HOST)}\.(?P<pid>\d+)\.tmp$")


def _tmp_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_tmp(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of checkpoint writes whose process is gone (killed mid-write);
    files of live processes and of other hosts (a shared file system) are left alone."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        m = _TMP.match(path.name)
        if m and int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"])):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _write_atomic(path: str | os.PathLike, write) -> None:
    _atomic(path, write, _tmp_path(path))  # a tmp name with host and pid: remove_stale_tmp finds leftovers


class AtomicCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` (same arguments) whose files a kill never leaves torn or dangling: at
    every moment ``last.ckpt``, when it exists, names a complete checkpoint.

    ``min_interval_s``: an epoch-end checkpoint is skipped when less than this many seconds of
    fitting have passed since the last one (or since the fit began), except at the last epoch. A
    checkpoint of VGG16 with SGD momentum is ~1 GB: on a GPU, where an epoch of CIFAR-10 takes
    seconds, writing one every epoch costs more than the epoch; on a CPU, where an epoch takes
    minutes, every epoch is still saved. A kill then loses at most ``min_interval_s`` of training
    plus the epoch in progress. 0: every epoch, as Lightning does.
    """

    def __init__(self, *args: Any, min_interval_s: float = 0.0, **kwargs: Any):
        if not isinstance(min_interval_s, int | float) or isinstance(min_interval_s, bool) or min_interval_s < 0:
            raise ValueError(f"min_interval_s must be a number of seconds >= 0, got {min_interval_s!r}")
        super().__init__(*args, **kwargs)
        self.min_interval_s = float(min_interval_s)
        self._held: list[str] | None = None  # removals waiting until last.ckpt is re-pointed
        self._since: float | None = None  # monotonic time of the fit's start or of the last save
        self._clock = time.monotonic

    # -- cadence -------------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer, *args: Any) -> None:
        self._since = self._clock()
        super().on_train_start(trainer, *args)

    def _too_soon(self, trainer: Trainer) -> bool:
        """Skip this save? Decided on rank zero and broadcast, so every rank agrees (a save is
        collective). The last epoch is saved apart, in ``on_train_epoch_end``."""
        if self.min_interval_s <= 0 or self._since is None or trainer.sanity_checking:
            return False
        return bool(trainer.strategy.broadcast(self._clock() - self._since < self.min_interval_s))

    def _save_final(self, trainer: Trainer) -> None:
        candidates = self._monitor_candidates(trainer)
        # A monitored metric may be absent from an epoch without validation: then last.ckpt alone.
        if self.monitor is None or self.monitor in candidates:
            self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    # -- writing -------------------------------------------------------------------------------
    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        plain = type(trainer.strategy.checkpoint_io) is TorchCheckpointIO and \
            type(trainer.strategy).save_checkpoint is Strategy.save_checkpoint
        if plain:  # one file, written here straight to its temporary name
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(self.save_weights_only)
            if trainer.is_global_zero:
                Path(filepath).parent.mkdir(parents=True, exist_ok=True)
                _write_atomic(filepath, lambda p: torch.save(checkpoint, p))
            trainer.strategy.barrier("AtomicCheckpoint._save_checkpoint")
        else:  # a strategy's own format (sharded, ...): written by it under the temporary name
            tmp = _tmp_path(filepath)
            trainer.save_checkpoint(tmp, self.save_weights_only)
            if trainer.is_global_zero:
                os.replace(tmp, filepath)
            trainer.strategy.barrier("AtomicCheckpoint._save_checkpoint")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        self._since = self._clock()
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    @staticmethod
    def _link_checkpoint(trainer: Trainer, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            if os.path.isdir(linkpath) and not os.path.islink(linkpath):
                shutil.rmtree(linkpath)
            tmp = _tmp_path(linkpath)
            tmp.unlink(missing_ok=True)
            try:
                os.symlink(os.path.relpath(filepath, os.path.dirname(linkpath)), tmp)
            except OSError:  # no symbolic links here (Windows without the right): a copy
                shutil.copyfile(filepath, tmp)
            os.replace(tmp, linkpath)  # the old link or the new one, never none
        trainer.strategy.barrier()

    # -- deleting ------------------------------------------------------------------------------
    def _remove_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        if self._held is not None:
            self._held.append(filepath)
        else:
            super()._remove_checkpoint(trainer, filepath)

    def _holding_removals(self, hook, trainer: Trainer, *args: Any) -> None:
        """Run a saving hook with the deletions it asks for held back until it has re-pointed
        ``last.ckpt``; an exception keeps the old files (a spare checkpoint costs only disk)."""
        self._held = []
        try:
            hook(trainer, *args)
            held = self._held
        finally:
            self._held = None
        last = os.path.realpath(self.last_model_path) if self.last_model_path else None
        for path in dict.fromkeys(held):
            if os.path.realpath(path) != last:
                super()._remove_checkpoint(trainer, path)

    def on_train_batch_end(self, trainer, *args):
        self._holding_removals(super().on_train_batch_end, trainer, *args)

    def on_train_epoch_end(self, trainer, *args):
        if not self._too_soon(trainer):
            self._holding_removals(super().on_train_epoch_end, trainer, *args)
        # The last epoch is always saved: its save may have been skipped as too soon, and where
        # Lightning saves at validation end (validation not every epoch) it may have none.
        if final_epoch(trainer) and not self._should_skip_saving_checkpoint(trainer):
            self._holding_removals(self._save_final, trainer)

    def on_validation_end(self, trainer, *args):
        if not self._too_soon(trainer):
            self._holding_removals(super().on_validation_end, trainer, *args)

    def on_exception(self, trainer, *args):
        self._holding_removals(super().on_exception, trainer, *args)

    def on_train_end(self, trainer, *args):
        self._holding_removals(super().on_train_end, trainer, *args)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A resumed run writes its own run folder, so the checkpoint's other dirpath is expected,
        # not worth Lightning's warning on every resume.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The dirpath has changed")
            super().load_state_dict(state_dict)


def batch_seed(seed: int, epoch: int, batch_idx: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(epoch), int(batch_idx)]).generate_state(1, np.uint64)[0])


class ResumeState(Callback):
    """Seeds the global RNGs before every training batch from (seed, epoch, batch index), and
    stamps every checkpoint with ``training_key`` and ``lineage`` (the key without the run's
    length) so that ``ckpt_path=auto`` and the fine-tune cache can tell what made it."""

    def __init__(self, seed: int, training_key: str, lineage: str):
        self.seed, self.training_key, self.lineage = int(seed), training_key, lineage

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        s = batch_seed(self.seed, trainer.current_epoch, batch_idx)
        torch.manual_seed(s)  # CPU and every CUDA device: dropout draws there
        np.random.seed(s % 2**32)
        random.seed(s)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[STAMP] = {"training_key": self.training_key, "lineage": self.lineage, "seed": self.seed}


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any] | None:
    """A checkpoint's position and stamp (``epoch``, ``global_step``, ``lr_schedulers``,
    ``training_key``, ``lineage``), or None when it is not a complete Lightning checkpoint
    (truncated by a kill, a dangling link, anything else). Mapped, not read: cheap for 1 GB."""
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # a torn zip, a dangling link, a foreign pickle: not resumable
        log.debug("not a complete checkpoint: %s (%s)", path, exc)
        return None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        return None
    stamp = ckpt.get(STAMP) if isinstance(ckpt.get(STAMP), dict) else {}
    return {"epoch": ckpt.get("epoch"), "global_step": ckpt["global_step"],
            "lr_schedulers": len(ckpt.get("lr_schedulers") or []),
            "training_key": stamp.get("training_key"), "lineage": stamp.get("lineage")}


def find_resume_checkpoint(folders: Iterable[str | os.PathLike], training_key: str) -> tuple[Path, dict] | None:
    """The complete checkpoint stamped with ``training_key`` that is furthest into training
    (newest file among equals) in ``folders`` and below them; None if there is none. Stale
    temporary files of killed writers found on the way are deleted."""
    seen: dict[str, Path] = {}
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*.ckpt")):
            real = os.path.realpath(path)
            if os.path.isfile(real):  # a dangling last.ckpt is skipped here
                seen.setdefault(real, Path(real))
        for tmp_dir in {p.parent for p in folder.rglob(".*.tmp")}:
            for gone in remove_stale_tmp(tmp_dir):
                log.info("removed %s, left by a killed checkpoint write", gone)
    best = None
    for path in seen.values():
        meta = read_checkpoint(path)
        if meta is None:
            log.warning("skipping %s: not a complete checkpoint (killed mid-write?)", path)
            continue
        if meta["training_key"] != training_key:
            continue
        rank = (meta["global_step"], path.stat().st_mtime)
        if best is None or rank > best[0]:
            best = (rank, path, meta)
    return None if best is None else (best[1], best[2])
