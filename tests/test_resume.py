"""A resumed fine-tune ends with the weights of an uninterrupted one (default and on-device data,
dropout included) and is cached like one; checkpoints a kill cannot tear or leave dangling, and
``ckpt_path=auto`` choosing the most advanced complete one of the same training."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning import Callback, LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from prunelab.callbacks.checkpoint import (
    AtomicCheckpoint,
    ResumeState,
    _tmp_path,
    find_resume_checkpoint,
    read_checkpoint,
)
from prunelab.compose import compose
from prunelab.data import SyntheticDataModule
from prunelab.data.arrays import EpochShuffle
from prunelab.data.on_device import epoch_seed
from prunelab.finetune import _cacheable, finetune, lineage_key, training_key
from prunelab.resolve import resolve_auto
from prunelab.trainer import build, build_trainer

# mobilenet_v3_small: small, and its head has dropout, the model-side randomness a resume must replay.
TINY = ["+experiment=smoke", "model.arch=mobilenet_v3_small", "data.train_size=64", "data.batch_size=8",
        "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "stages.prune=false",
        "stages.latency=false", "logger=none", "trainer.enable_progress_bar=false", "trainer.max_epochs=3",
        # every epoch checkpointed: these epochs take a second, the default cadence would save only the last
        "callbacks.model_checkpoint.min_interval_s=0"]
# The default path with a loader worker: its RNG is seeded once per process, so only per-sample
# seeds make a resumed run's augmentations equal the uninterrupted run's.
PATHS = {"default": ["data.num_workers=1"], "on_device": ["data.on_device=true"],
         # the from-scratch recipe: a per-step schedule whose state must resume where it stopped
         "recipe": ["data.on_device=true", "model.schedule=cosine", "model.warmup_epochs=0.5",
                    "model.nesterov=true", "model.label_smoothing=0.1"]}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a loaded 2-core machine two threads spin-wait on each other and a
    small model's step takes seconds instead of tens of milliseconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Killed(Exception):
    """Stands for SIGKILL: the files on disk are what the run had written when it stopped."""


class _KillAt(Callback):
    def __init__(self, epoch: int, batch: int):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise Killed(f"epoch {self.epoch}, batch {self.batch}")


def _fit(root: Path, name: str, overrides: list[str], kill: tuple[int, int] | None = None):
    """The pipeline's fine-tune stage alone; output in the task's run folder, as a real run's."""
    cfg = compose(overrides, root, root / "logs" / "smoke" / "runs" / name)
    resolve_auto(cfg)  # as the pipeline does before building anything
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dm, module = build(cfg.data, "data"), build(cfg.model, "model")
    dm.setup("fit")
    trainer = build_trainer(cfg, enable_model_summary=False)
    if kill:
        trainer.callbacks.append(_KillAt(*kill))
    result = finetune(cfg, trainer, module, dm)
    return {k: v.detach().clone() for k, v in module.net.state_dict().items()}, result, cfg


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:  # equal up to floating-point nondeterminism (in practice bitwise on this CPU)
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted 3-epoch fine-tunes, one per data path, computed once."""
    cache: dict[str, dict] = {}

    def get(path: str) -> dict:
        if path not in cache:
            root = tmp_path_factory.mktemp(f"ref-{path}")
            cache[path] = _fit(root, "ref", TINY + PATHS[path] + ["finetune.cache=false"])[0]
        return cache[path]

    return get


@pytest.mark.parametrize("path", list(PATHS))
def test_killed_mid_epoch_resumes_to_the_uninterrupted_weights_and_is_cached(tmp_path, reference, path):
    args = TINY + PATHS[path]
    with pytest.raises(Killed):  # mid-epoch 2: epochs 0 and 1 checkpointed, epoch 2 restarts
        _fit(tmp_path, "killed", args, kill=(2, 1))
    ckpts = tmp_path / "logs" / "smoke" / "runs" / "killed" / "checkpoints"
    assert os.readlink(ckpts / "last.ckpt") == "epoch001.ckpt" and not (ckpts / "epoch000.ckpt").exists()
    weights, result, cfg = _fit(tmp_path, "resumed", [*args, "ckpt_path=auto"])
    assert not result.reused and str(ckpts / "epoch001.ckpt") in result.source
    _assert_same_weights(weights, reference(path))
    # completed and cached: its own checkpoints went; the killed run's, which it resumed, are not its to delete
    assert not list((tmp_path / "logs" / "smoke" / "runs" / "resumed").rglob("*.ckpt"))
    assert (ckpts / "epoch001.ckpt").is_file()
    # cached under the config's key like a fine-tune that was never interrupted: the next run reuses it
    again, result, _ = _fit(tmp_path, "again", [*args, "ckpt_path=auto"])
    assert result.reused and result.source == str(Path(cfg.finetune.cache_dir) / training_key(cfg) / "dense.pt")
    _assert_same_weights(again, weights)


def test_a_completed_cached_fine_tune_keeps_no_checkpoint_in_its_run_folder(tmp_path):
    args = TINY + PATHS["on_device"]
    runs = tmp_path / "logs" / "smoke" / "runs"
    weights, result, cfg = _fit(tmp_path, "done", args)
    cached = Path(cfg.finetune.cache_dir) / training_key(cfg) / "dense.pt"
    assert not result.reused and result.cached == str(cached) and cached.is_file()
    assert not list((runs / "done").rglob("*.ckpt")) and not (runs / "done" / "checkpoints").exists()
    # nothing of this training is left for ckpt_path=auto, and it needs none: the cache serves the next run
    assert find_resume_checkpoint([tmp_path / "logs"], training_key(cfg)) is None
    again, result, _ = _fit(tmp_path, "again", [*args, "ckpt_path=auto"])
    assert result.reused and result.cached == str(cached)
    _assert_same_weights(again, weights)


def test_keep_checkpoint_and_an_uncached_fine_tune_keep_the_checkpoint(tmp_path):
    runs = tmp_path / "logs" / "smoke" / "runs"
    args = TINY + PATHS["on_device"] + ["trainer.max_epochs=1"]
    _, kept, cfg = _fit(tmp_path, "kept", [*args, "finetune.keep_checkpoint=true"])
    assert kept.cached and read_checkpoint(runs / "kept" / "checkpoints" / "last.ckpt")["training_key"] == kept.key
    _, plain, _ = _fit(tmp_path, "plain", [*args, "finetune.cache=false", "seed=1"])
    assert plain.cached is None and (runs / "plain" / "checkpoints" / "last.ckpt").is_file()


def test_resuming_a_shorter_run_gives_and_caches_the_longer_run(tmp_path, reference):
    args = TINY + PATHS["default"]
    _fit(tmp_path, "two", [*args, "trainer.max_epochs=2", "finetune.cache=false"])
    last = tmp_path / "logs" / "smoke" / "runs" / "two" / "checkpoints" / "last.ckpt"
    weights, result, _ = _fit(tmp_path, "three", [*args, f"ckpt_path={last}"])
    _assert_same_weights(weights, reference("default"))
    reused, result, _ = _fit(tmp_path, "plain", args)
    assert result.reused
    _assert_same_weights(reused, weights)


# -- the data: order and augmentation from (seed, epoch) alone -------------------------------------------
def test_epoch_order_and_augmentation_depend_only_on_seed_and_epoch():
    s = EpochShuffle(50, seed=7)
    history = [list(s) for _ in range(3)]  # no set_epoch: each pass is the next epoch
    fresh = EpochShuffle(50, seed=7)
    fresh.set_epoch(2)
    assert list(fresh) == history[2] and history[0] != history[1]
    assert sorted(i for i, _ in history[1]) == list(range(50))
    # seed 8's epoch 0 is not seed 7's epoch 1 (seed + epoch made seed sweeps share batches)
    assert epoch_seed(8, 0) != epoch_seed(7, 1)

    def epoch_batches(dm, epoch, workers):
        dm.num_workers = workers
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return [b for b in loader]

    dm = SyntheticDataModule(train_size=96, test_size=8, batch_size=16)
    dm.setup()
    torch.manual_seed(0)
    a = epoch_batches(dm, 1, 0)
    after_epoch = torch.rand(1)
    torch.manual_seed(0)
    iter(dm.train_dataloader())  # making an iterator draws its base seed; the augmentations draw nothing
    assert torch.equal(torch.rand(1), after_epoch)  # so the model's dropout stream is left alone
    torch.manual_seed(123)  # another global RNG history: no effect on the batches
    b = epoch_batches(dm, 1, 2)  # and two loader workers draw the same augmentations
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True))
    assert not torch.equal(epoch_batches(dm, 0, 0)[0][0], a[0][0])


# -- checkpoint files at every step of a kill ---------------------------------------------------------
class _Tiny(LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class _TinyVal(_Tiny):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))


def _tiny_fit(folder: Path, epochs: int, callbacks: list, ckpt_path=None, val_every: int | None = None) -> Trainer:
    """4 training batches an epoch; with ``val_every``, a validation every that many epochs."""
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 4, generator=g), torch.randint(0, 2, (32,), generator=g))
    extra = {"check_val_every_n_epoch": val_every, "num_sanity_val_steps": 0} if val_every else {}
    trainer = Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=folder, callbacks=callbacks, accelerator="cpu", **extra)
    loaders = {"val_dataloaders": DataLoader(data, batch_size=8)} if val_every else {}
    trainer.fit(_TinyVal() if val_every else _Tiny(), DataLoader(data, batch_size=8), ckpt_path=ckpt_path, **loaders)
    return trainer


def test_dropout_draws_of_a_resumed_fit_are_those_of_the_uninterrupted_one(tmp_path):
    """Each run seeds its global RNG at the start (the pipeline's seed_everything), so without
    ResumeState a resumed fit's dropout masks restart the stream: those of epoch 0, not epoch k."""
    def fit(name, epochs, ckpt_path=None):
        L.seed_everything(0, verbose=False)
        folder = tmp_path / name
        trainer = _tiny_fit(folder, epochs, [_checkpoint(folder), ResumeState(0, "K", "L")], ckpt_path)
        return trainer.lightning_module.net.state_dict()

    full = fit("full", 3)
    fit("part", 2)
    _assert_same_weights(fit("resumed", 3, tmp_path / "part" / "last.ckpt"), full)


def _checkpoint(folder: Path, keep: int = 1, min_interval_s: float = 0) -> AtomicCheckpoint:
    """As conf/callbacks/model_checkpoint.yaml configures it (every epoch unless told)."""
    return AtomicCheckpoint(dirpath=folder, filename="epoch{epoch:03d}", auto_insert_metric_name=False,
                            save_last="link", save_top_k=keep, min_interval_s=min_interval_s)


class _Clock:
    """A fake monotonic clock that advances ``step`` seconds at every training batch."""

    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        return self.now


class _Tick(Callback):
    def __init__(self, clock: _Clock):
        self.clock = clock

    def on_train_batch_end(self, *args):
        self.clock.now += self.clock.step


def _saved_epochs(folder: Path, interval: float, seconds_per_batch: float, epochs: int = 6, **fit) -> list[int]:
    """Epochs whose end wrote a checkpoint, with a fake clock (4 batches an epoch)."""
    ckpt = _checkpoint(folder, keep=-1, min_interval_s=interval)
    ckpt._clock = clock = _Clock(seconds_per_batch)
    _tiny_fit(folder, epochs, [_Tick(clock), ckpt], **fit)
    return sorted(int(p.stem.removeprefix("epoch")) for p in folder.glob("epoch*.ckpt"))


@pytest.mark.parametrize(("interval", "per_batch", "epochs"), [
    (0, 1.0, [0, 1, 2, 3, 4, 5]),  # 0: every epoch, as Lightning
    (10, 1.0, [2, 5]),  # 4 s an epoch: the first epoch end 10 s past the fit's start (12 s), then 12 s past it, and the last
    (10, 0.5, [4, 5]),  # 2 s an epoch: 10 s reached at epoch 4's end; the last epoch is always saved
    (10, 5.0, [0, 1, 2, 3, 4, 5]),  # epochs longer than the interval: each is saved
    (1000, 1.0, [5]),  # a fit shorter than the interval: only the last epoch
])
def test_checkpoint_cadence_follows_fitting_time_and_always_saves_the_last_epoch(tmp_path, interval, per_batch, epochs):
    assert _saved_epochs(tmp_path, interval, per_batch) == epochs
    assert os.readlink(tmp_path / "last.ckpt") == "epoch005.ckpt"


@pytest.mark.parametrize(("interval", "epochs"), [(0, [1, 2]), (1000, [2])])
def test_last_epoch_is_saved_where_lightning_saves_at_validation_end_and_it_has_none(tmp_path, interval, epochs):
    """Validation every 2nd epoch: Lightning saves at validation end (epoch 1), so a 3-epoch fit's
    last epoch, which does not validate, would go unsaved; with a long interval it would save nothing."""
    assert _saved_epochs(tmp_path, interval, 1.0, epochs=3, val_every=2) == epochs
    assert os.readlink(tmp_path / "last.ckpt") == "epoch002.ckpt"


def test_a_stop_requested_mid_fit_still_leaves_a_checkpoint_of_the_last_epoch(tmp_path):
    class StopAt(Callback):
        def on_train_epoch_end(self, trainer, *args):
            trainer.should_stop = trainer.current_epoch == 2

    ckpt = _checkpoint(tmp_path, keep=-1, min_interval_s=1000)
    ckpt._clock = _Clock(0.0)
    _tiny_fit(tmp_path, 6, [StopAt(), ckpt])  # callbacks run before ModelCheckpoint, as Lightning orders them
    assert [p.name for p in sorted(tmp_path.glob("epoch*.ckpt"))] == ["epoch002.ckpt"]


@pytest.mark.parametrize("bad", [-1, "300", True])
def test_checkpoint_interval_is_checked_when_built(tmp_path, bad):
    with pytest.raises(ValueError, match="min_interval_s"):
        _checkpoint(tmp_path, min_interval_s=bad)


def test_last_ckpt_names_a_complete_checkpoint_after_every_file_operation(tmp_path, monkeypatch):
    """Each file-system call is a point a kill can stop at: after every one, ``last.ckpt`` (once it
    exists) loads as a complete checkpoint. Lightning's ModelCheckpoint deleted the old file before
    re-pointing the link (a dangling last.ckpt) and wrote checkpoints in place (torn files)."""
    folder = tmp_path / "checkpoints"
    states = []

    def checked(fn):
        def call(*args, **kwargs):
            out = fn(*args, **kwargs)
            last = folder / "last.ckpt"
            if os.path.lexists(last):
                states.append(read_checkpoint(last) is not None)
            for f in folder.glob("*.ckpt"):  # no name ever holds a part of a file
                if not f.is_symlink():
                    assert read_checkpoint(f) is not None, f"{f.name} torn after {fn.__name__}{args}"
            return out
        return call

    for name in ("replace", "rename", "remove", "unlink", "symlink"):
        monkeypatch.setattr(os, name, checked(getattr(os, name)))
    _tiny_fit(tmp_path, 4, [_checkpoint(folder)])
    monkeypatch.undo()
    assert len(states) >= 8 and all(states), states
    assert sorted(p.name for p in folder.iterdir()) == ["epoch003.ckpt", "last.ckpt"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _writer_tmp(name: str, pid: int) -> str:
    """The temporary name process ``pid`` of this host writes checkpoint ``name`` under."""
    return _tmp_path(name).name.replace(f".{os.getpid()}.", f".{pid}.")


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> tuple[bytes, bytes]:
    """The bytes of an epoch-0 and an epoch-1 checkpoint stamped with training key K."""
    folder = tmp_path_factory.mktemp("made") / "checkpoints"
    _tiny_fit(folder.parent, 2, [_checkpoint(folder, keep=-1), ResumeState(0, "K", "L")])
    return (folder / "epoch000.ckpt").read_bytes(), (folder / "epoch001.ckpt").read_bytes()


# Files on disk at each point a kill can hit between epoch 0's checkpoint and epoch 1's, and what
# ckpt_path=auto must pick. "e0"/"e1": complete checkpoints; "torn": e1's first half; "tmp": e1 half
# written under the temporary name of a writer that is gone; "->x": a link to x.
KILL_STATES = {
    "epoch 0 saved": ({"epoch000.ckpt": "e0", "last.ckpt": "->epoch000.ckpt"}, "epoch000.ckpt"),
    "writing epoch 1": ({"epoch000.ckpt": "e0", "last.ckpt": "->epoch000.ckpt", "tmp": "torn"}, "epoch000.ckpt"),
    "epoch 1 renamed in": ({"epoch000.ckpt": "e0", "epoch001.ckpt": "e1", "last.ckpt": "->epoch000.ckpt"},
                           "epoch001.ckpt"),
    "link swapped": ({"epoch000.ckpt": "e0", "epoch001.ckpt": "e1", "last.ckpt": "->epoch001.ckpt"}, "epoch001.ckpt"),
    "old removed": ({"epoch001.ckpt": "e1", "last.ckpt": "->epoch001.ckpt"}, "epoch001.ckpt"),
    # states of Lightning's own ModelCheckpoint, found in earlier runs' folders
    "dangling last (old order)": ({"epoch001.ckpt": "e1", "last.ckpt": "->epoch000.ckpt"}, "epoch001.ckpt"),
    "torn in place (old write)": ({"epoch000.ckpt": "e0", "epoch001.ckpt": "torn", "last.ckpt": "->epoch000.ckpt"},
                                  "epoch000.ckpt"),
    "only torn": ({"epoch000.ckpt": "torn"}, None),
}


@pytest.mark.parametrize("state", list(KILL_STATES))
def test_auto_picks_the_newest_complete_checkpoint_in_every_kill_state(tmp_path, two_checkpoints, state):
    files, expected = KILL_STATES[state]
    e0, e1 = two_checkpoints
    content = {"e0": e0, "e1": e1, "torn": e1[: len(e1) // 2]}
    run = tmp_path / "logs" / "smoke" / "runs" / "killed" / "checkpoints"
    run.mkdir(parents=True)
    for name, what in files.items():
        if what.startswith("->"):
            os.symlink(what[2:], run / name)
        elif name == "tmp":
            (run / _writer_tmp("epoch001.ckpt", _dead_pid())).write_bytes(content[what])
        else:
            (run / name).write_bytes(content[what])
    live = run / _writer_tmp("epoch002.ckpt", os.getppid())
    live.write_bytes(b"being written by a live process")
    found = find_resume_checkpoint([tmp_path / "fresh-run" / "checkpoints", tmp_path / "logs" / "smoke"], "K")
    assert (found[0].name if found else None) == expected
    # stale temporary files of dead writers are cleaned, a live writer's file is left alone
    assert [p.name for p in run.glob(".*.tmp")] == [live.name]
    # another training's checkpoints are never picked
    assert find_resume_checkpoint([tmp_path / "logs"], "other") is None


def test_resumed_fine_tune_is_cached_only_when_its_checkpoint_is_this_training(tmp_path):
    cfg = compose(TINY, tmp_path)
    key, lineage = training_key(cfg), lineage_key(cfg)

    def ckpt(name, stamp, epoch=1, schedulers=()):
        path = tmp_path / f"{name}.ckpt"
        body = {"state_dict": {}, "epoch": epoch, "global_step": 4 * (epoch + 1), "lr_schedulers": list(schedulers)}
        if stamp:
            body["prunelab"] = stamp
        torch.save(body, path)
        return str(path)

    assert _cacheable(None, cfg, key)
    assert _cacheable(ckpt("same", {"training_key": key, "lineage": lineage}), cfg, key)
    assert _cacheable(ckpt("shorter", {"training_key": "k2", "lineage": lineage}, epoch=1), cfg, key)
    assert _cacheable(ckpt("at end", {"training_key": "k2", "lineage": lineage}, epoch=2), cfg, key)
    assert not _cacheable(ckpt("longer", {"training_key": "k9", "lineage": lineage}, epoch=3), cfg, key)
    assert not _cacheable(ckpt("other", {"training_key": "k2", "lineage": "x"}), cfg, key)
    assert not _cacheable(ckpt("unstamped", None), cfg, key)
    assert not _cacheable(ckpt("scheduled", {"training_key": "k2", "lineage": lineage}, schedulers=[{}]), cfg, key)
    torn = tmp_path / "torn.ckpt"
    torn.write_bytes(Path(ckpt("t", None)).read_bytes()[:50])
    assert not _cacheable(str(torn), cfg, key)
