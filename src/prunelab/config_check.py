"""Eager validation of the composed config: bad values stop the run before any work, with one
message that names the key and says what to change.

``check`` = ``check_values`` (one table of key -> what it must be for the groups without typed
settings, driven by one loop; each of ``prune``, ``search`` and ``latency`` checked by its own
``check`` beside its typed spec: ``pruning.spec``, ``search.spec``, ``deploy.spec``; plus the few
rules that involve two groups) + ``preflight`` (what the machine and the file system must provide:
the device, every file the run reads, the folders it writes). Keys missing from the config are
skipped, so config groups may add keys or leave optional ones out.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from prunelab import hardware
from prunelab.deploy import spec as latency_group
from prunelab.deploy.registry import AUTO, RUNTIMES
from prunelab.errors import ConfigError
from prunelab.lr_schedule import LR_SCHEDULES
from prunelab.models.rewrite import data_image_size, fold_training_problem
from prunelab.pruning import spec as prune_group
from prunelab.search import spec as search_group
from prunelab.value_specs import (
    BOOL,
    BOOL_AUTO,
    TEXT,
    Spec,
    check_rules,
    choice,
    either,
    integer,
    is_int,
    list_of,
    number,
    optional,
    plain,
)

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
CIFAR_TARGET = "prunelab.data.CIFAR10DataModule"
IMAGEFOLDER_TARGET = "prunelab.data.ImageFolderDataModule"
MODEL_TARGET = "prunelab.models.ImageClassifier"
MAX_SEED = 2**32 - 1  # Lightning's seed_everything swaps a seed outside [0, 2**32) for a random one
# The groups whose keys and checks live beside their typed settings, in the order they are checked.
GROUPS = (prune_group, search_group, latency_group)


def _precision_ok(v) -> bool:
    try:  # the same parser the run resolves it with; the machine does not matter for validity
        hardware.resolve_precision(v, hardware.Hardware("cpu", "any"))
    except ConfigError:
        return False
    return True


PRECISION: Spec = (f"one of auto, {', '.join(hardware.PRECISIONS)} (or {', '.join(hardware.PRECISION_ALIASES)})",
                   _precision_ok)


def rules() -> list[tuple[str, Spec]]:
    """Every numeric and enum key of the groups that have no typed settings of their own, and what
    it must be (``prune``, ``search`` and ``latency`` check theirs: ``GROUPS``)."""
    return [
        ("seed", integer(0, MAX_SEED)),
        ("ckpt_path", optional(TEXT)),
        *((k, BOOL) for k in ("stages.prune", "stages.latency", "finetune.cache", "finetune.keep_checkpoint",
                              "data.download", "data.on_device",
                              "data.pin_memory", "data.augment", "model.fused_optimizer", "trainer.enable_progress_bar",
                              "trainer.sync_batchnorm")),
        *((k, TEXT) for k in ("task_name", "data.root", "data.cache_dir", "model.arch", "trainer.strategy", "finetune.cache_dir",
                              "paths.data_dir", "paths.log_dir", "paths.cache_dir", "paths.output_dir")),
        # data
        ("data.batch_size", integer(1)),
        ("data.eval_batch_size", optional(integer(1))),
        ("data.num_workers", integer(0)),
        ("data.val_fraction", number(0, 1, lo_open=True)),
        ("data.train_size", optional(integer(2))),
        ("data.test_size", optional(integer(1))),
        ("data.seed", integer(0, MAX_SEED)),
        ("data.noise", number(0)),
        ("data.image_size", integer(8)),
        ("data.cutout", integer(0)),
        ("data.decode_workers", optional(integer(1))),
        # model
        ("model.weights", optional(TEXT)),
        ("model.num_classes", integer(2)),
        ("model.lr", number(0, lo_open=True)),
        ("model.momentum", number(0, 1)),
        ("model.weight_decay", number(0)),
        ("model.nesterov", BOOL),
        ("model.label_smoothing", number(0, 1)),
        ("model.schedule", choice(*LR_SCHEDULES)),
        ("model.warmup_epochs", number(0)),
        ("model.dropout", optional(number(0, 1))),
        ("model.channels_last", BOOL_AUTO),
        ("model.compile", BOOL_AUTO),
        ("model.fold_classifier", BOOL_AUTO),
        ("model.compile_mode", choice(*hardware.COMPILE_MODES)),
        # trainer
        ("trainer.accelerator", choice(*ACCELERATORS)),
        ("trainer.devices", either(integer(1), choice("auto", -1), list_of(integer(0), ""),
                                   words="an integer >= 1, -1 (all), auto, or a list of indices like trainer.devices=[0,1]")),
        ("trainer.num_nodes", integer(1)),
        ("trainer.precision", PRECISION),
        ("trainer.max_epochs", integer(1)),
        ("trainer.check_val_every_n_epoch", optional(integer(1))),
        ("trainer.max_steps", either(integer(1), choice(-1))),
        ("trainer.log_every_n_steps", optional(integer(1))),
        ("trainer.num_sanity_val_steps", integer(-1)),
        ("trainer.accumulate_grad_batches", integer(1)),
        ("trainer.gradient_clip_val", optional(number(0))),
        ("trainer.deterministic", either(BOOL, choice("warn"))),
        *((f"trainer.limit_{s}_batches", optional(either(integer(0), number(0, 1, hi_open=False),
                                                         words="a number of batches >= 0 or a fraction in [0, 1]")))
          for s in ("train", "val", "test")),
        ("finetune.weights_path", optional(TEXT)),
        ("callbacks.model_checkpoint.min_interval_s", number(0)),
    ]


# prunelab's own config groups: every key they may hold is in their option files (model, data and
# trainer pass further keys on to torchvision, the data module and Lightning, so they are open).
OWN_GROUPS = ("search", "prune", "latency", "finetune", "stages")


def known_keys(group: str) -> set[str]:
    """The keys of ``group`` across its option files under conf/ (``stages``: train.yaml's), those of
    its subfolders included (``prune/options/``: each method's own)."""
    conf = Path(__file__).parent / "conf"
    files = [conf / "train.yaml"] if group == "stages" else sorted((conf / group).rglob("*.yaml"))
    keys: set[str] = set()
    for f in files:
        node = OmegaConf.load(f)
        node = node.get(group) if group == "stages" else node
        keys |= {str(k) for k in (node or {}) if k != "defaults"}
    return keys


def check_unknown_keys(cfg: DictConfig) -> None:
    """A key prunelab never reads, added to one of its own groups (``+search.tolerence=2``), stops
    the run with the nearest valid name instead of being ignored."""
    for group in OWN_GROUPS:
        node = cfg.get(group)
        if not isinstance(node, DictConfig):
            continue
        known = known_keys(group)
        for key in node:
            if str(key) not in known:
                near = difflib.get_close_matches(str(key), sorted(known), n=1)
                hint = f"did you mean {group}.{near[0]}?" if near else f"valid keys: {', '.join(sorted(known))}"
                raise ConfigError(f"{group}.{key} is not a prunelab setting (it would be ignored); {hint}")


def check_values(cfg: DictConfig) -> None:
    latency_group.check_retired(cfg)  # before the unknown keys: a retired key gets its own advice
    check_unknown_keys(cfg)
    if plain(cfg, "data._target_") == IMAGEFOLDER_TARGET and not plain(cfg, "data.root"):
        raise ConfigError("data=imagefolder needs data.root=PATH: a folder holding train/ and test/ (and val/), "
                          "one subfolder of images per class in each")
    check_rules(cfg, rules())
    for group in GROUPS:
        if group.GROUP in cfg:
            group.check(cfg)
    _check_processes(cfg)
    if cfg.trainer.get("max_epochs") is None:  # removed with ~trainer.max_epochs: Lightning would train 1000
        raise ConfigError("trainer.max_epochs is missing; set it to the number of fine-tuning epochs, e.g. "
                          "trainer.max_epochs=10")
    if cfg.get("ckpt_path") and str(cfg.ckpt_path) != "auto" and cfg.finetune.get("weights_path"):
        raise ConfigError("ckpt_path and finetune.weights_path are both set, but a run starts from one of them; "
                          "set the other to null")
    _check_model(cfg.get("model") or {})
    _check_fold(cfg)
    _check_recover_steps(cfg)


def _several_processes(trainer: DictConfig) -> bool:
    devices = trainer.get("devices", 1)
    return trainer.get("strategy") == "ddp" or (is_int(devices) and (devices > 1 or devices == -1)) or \
        (isinstance(devices, (list, ListConfig)) and len(devices) > 1) or (trainer.get("num_nodes") or 1) > 1


def _check_processes(cfg: DictConfig) -> None:
    """The prune stage's settings that run in one process only, against a trainer of several."""
    if "prune" not in cfg or not _several_processes(cfg.trainer):
        return
    prune = prune_group.prune_spec(cfg)
    if prune.iterative:
        raise ConfigError("prune.schedule=iterative runs in one process; use trainer.devices=1 (no DDP) for it")
    if prune.searches and "search" in cfg and search_group.search_spec(cfg).objective == "latency":
        # Latency is timed on rank zero alone (ranks sharing a machine would skew it), so the other
        # ranks could not agree on the fastest model.
        raise ConfigError("search.objective=latency times candidates in one process; use trainer.devices=1 "
                          "(no DDP) for it, or an objective every rank computes alike (macs, params, bytes)")


def _check_recover_steps(cfg: DictConfig) -> None:
    """A list of recovery budgets no longer than the iterative schedule's steps: an entry past them
    would never be used, so the list does not say what the run does."""
    if "prune" not in cfg:
        return
    prune = prune_group.prune_spec(cfg)
    if not prune.iterative or len(prune.recover_epochs) == 1:
        return
    steps, where = (prune.steps, f"prune.steps={prune.steps}") if not prune.searches else \
        (len(search_group.search_spec(cfg).grid), "one per search.grid value")
    if len(prune.recover_epochs) > steps:
        raise ConfigError(f"prune.recover_epochs lists {len(prune.recover_epochs)} recovery budgets, but the "
                          f"iterative schedule takes {steps} steps ({where}); give at most {steps}")


def _check_fold(cfg: DictConfig) -> None:
    """model.fold_classifier=true only where the fold is exact (VGG, features ending at 1x1)."""
    model = cfg.get("model") or {}
    if model.get("fold_classifier") is not True:
        return
    problem = fold_training_problem(model.get("arch", ""), data_image_size(cfg))
    if problem:
        raise ConfigError(f"model.fold_classifier=true, but {problem}; set model.fold_classifier=auto (or false)")


def _check_model(model) -> None:
    """model.arch is a torchvision classifier, and model.weights a file or one of its weight sets."""
    if model.get("_target_") == MODEL_TARGET:
        from torchvision import models as tvm

        if model.arch not in tvm.list_models(module=tvm):
            raise ConfigError(f"model.arch={model.arch} is not a torchvision classification model "
                              "(e.g. vgg16, resnet18)")
        from prunelab.models.factory import is_weights_file

        if is_weights_file(model.get("weights")):
            from prunelab.io import file_problem

            problem = file_problem(Path(str(model.weights)).expanduser())
            if problem:
                raise ConfigError(f"model.weights={model.weights} {problem}; give a state_dict file of this model "
                                  "(such as a run's models/dense.pt), a weight set name, or null")
        elif model.get("weights") is not None and model.weights not in tvm.get_model_weights(model.arch).__members__:
            options = ", ".join(w.name for w in tvm.get_model_weights(model.arch))
            raise ConfigError(f"model.weights={model.weights} is not a weight set of {model.arch}; "
                              f"use one of {options} or null")


# --- pre-flight: the machine and the file system ------------------------------------------------------


def _check_ckpt(cfg: DictConfig) -> None:
    import zipfile

    from prunelab.io import file_problem

    if not cfg.get("ckpt_path") or str(cfg.ckpt_path) == "auto":  # auto: the fine-tune finds the newest complete one
        return
    path = Path(cfg.ckpt_path).expanduser()
    problem = file_problem(path, inside=("checkpoints/last.ckpt", "last.ckpt"))
    if problem is None and not zipfile.is_zipfile(path):
        problem = "is not a checkpoint written by Lightning (torch.save's zip format)"
    if problem is None:
        from prunelab.callbacks.checkpoint import read_checkpoint

        if read_checkpoint(path) is None:  # mapped, not read: cheap however large
            problem = ("loads, but is not a complete Lightning checkpoint (no state_dict and global_step; "
                       "a torch.save of something else, or a file cut short)")
    if problem:
        raise ConfigError(f"ckpt_path={path} {problem}; point it at a Lightning checkpoint such as an earlier "
                          "run's checkpoints/last.ckpt, or set ckpt_path=null")


def _check_machine(cfg: DictConfig) -> None:
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={accelerator} but this machine has no usable CUDA GPU "
                          "(torch.cuda.is_available() is false); use trainer.accelerator=cpu or auto")
    devices = cfg.trainer.get("devices", 1)
    if accelerator in ("gpu", "cuda") and is_int(devices) and devices > torch.cuda.device_count():
        raise ConfigError(f"trainer.devices={devices} but this machine has {torch.cuda.device_count()} CUDA GPU(s); "
                          "use at most that many, or trainer.devices=-1 for all")
    from lightning.pytorch.strategies import StrategyRegistry  # Lightning's list, registered ones included

    strategy = cfg.trainer.get("strategy", "auto")
    if strategy != "auto" and strategy not in StrategyRegistry:
        common = [s for s in ("ddp", "ddp_spawn", "fsdp", "deepspeed") if s in StrategyRegistry]
        raise ConfigError(f"trainer.strategy={strategy} is not a Lightning strategy; use auto or one such as "
                          f"{', '.join(common)}")
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("trainer.accelerator=mps but this machine has no MPS device; use trainer.accelerator=cpu or auto")
    for name, logger in (cfg.get("logger") or {}).items():
        # Lightning's TensorBoardLogger writes with tensorboard, or else tensorboardX.
        if logger and str(logger.get("_target_", "")).endswith("TensorBoardLogger") and not any(
                importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
            raise ConfigError(f"logger={name} needs the tensorboard extra (tensorboard is not installed): "
                              "pip install prunelab[tensorboard], or use logger=csv")
    runtime = str(cfg.get("latency", {}).get("runtime", AUTO))
    if cfg.stages.get("latency") and runtime in RUNTIMES:  # a runtime asked for by name: its extra, before any work
        from prunelab.deploy.registry import get

        missing = get(runtime).missing()
        if missing:
            raise ConfigError(missing)


def _missing_prerequisites(cfg: DictConfig) -> list[str]:
    """Data on disk that a run without download needs, and, alongside, the pretrained weights that
    are not in the torch hub cache, so an offline user learns of both at once. Weights alone are
    not flagged: a run that may download them should (nothing network-related is tried here)."""
    from prunelab.data.cifar10 import FOLDER, TEST_FILES, TRAIN_FILES

    missing = []
    data, model = cfg.data, cfg.model
    if data.get("_target_") == CIFAR_TARGET and not data.get("download", True):
        folder = Path(data.root).expanduser() / FOLDER
        absent = [f for f in TRAIN_FILES + TEST_FILES if not (folder / f).is_file()]
        if absent:
            missing.append(f"CIFAR-10 data: {folder} lacks {', '.join(absent)} and data.download=false (put an "
                           f"extracted {FOLDER} under data.root, or set data.download=true)")
    if data.get("_target_") == IMAGEFOLDER_TARGET:
        from prunelab.data.imagefolder import scan
        from prunelab.errors import DataUnavailableError

        try:
            scan(data.root)  # the folders alone: images are decoded (and refused) when the data load
        except DataUnavailableError as exc:
            missing.append(str(exc))
    from prunelab.models.factory import is_weights_file

    if missing and model.get("_target_") == MODEL_TARGET and model.get("weights") is not None \
            and not is_weights_file(model.weights):
        from torchvision import models as tvm

        filename = tvm.get_model_weights(model.arch)[model.weights].url.rsplit("/", 1)[-1]
        cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
        if not cached.is_file() or cached.stat().st_size == 0:
            missing.append(f"model.weights={model.weights}: {filename} is not in the torch hub cache "
                           f"{cached.parent} and would be downloaded (put it there, or set model.weights=null)")
    return missing


def probe_writable(key: str, folder: Path, advice: str, created: list[Path]) -> None:
    """Create ``folder`` and write (then remove) a probe file in it: an unwritable folder is found
    now, not after the fine-tune. Folders it creates are added to ``created``."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{key}={folder} is a file, not a folder; {advice}")
    new = [d for d in (folder, *folder.parents) if not d.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        created.extend(new)
        fd, probe = tempfile.mkstemp(prefix=".prunelab-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"{key}={folder} is not writable ({exc.strerror or exc}); {advice}") from None


def preflight(cfg: DictConfig) -> None:
    from prunelab.finetune import check_start_weights  # Lightning: imported when a run is about to start

    _check_machine(cfg)
    _check_ckpt(cfg)
    check_start_weights(cfg)
    missing = _missing_prerequisites(cfg)
    if missing:
        raise ConfigError(f"missing before the run can start: {'; '.join(missing)}")
    # Last, so that a run stopped by anything above creates no folder; a failed probe removes the
    # (empty) folders the probes made.
    probes = [("paths.output_dir", cfg.paths.output_dir, "choose a writable folder with paths.log_dir=...")]
    if cfg.finetune.get("cache"):
        probes.append(("finetune.cache_dir", cfg.finetune.cache_dir,
                       "set paths.cache_dir to a writable folder, or finetune.cache=false"))
    created: list[Path] = []
    try:
        for key, folder, advice in probes:
            probe_writable(key, Path(folder).expanduser(), advice, created)
    except ConfigError:
        for d in sorted(created, key=lambda d: len(d.parts), reverse=True):  # deepest first
            d.rmdir()
        raise


def check(cfg: DictConfig) -> None:
    """Every check, values first: raises one ConfigError naming the key (or file) to change."""
    check_values(cfg)
    preflight(cfg)
