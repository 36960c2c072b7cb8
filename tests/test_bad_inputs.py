"""Nothing silently wrong: every bad input stops the run before any work with one stderr line that
names the key (or file) to change, exit status 2, no traceback, and nothing written.

The table runs in-process through ``prunelab.train.execute`` (what ``python -m prunelab.train``
does minus Hydra) on ``+experiment=smoke``, with ``Trainer.fit`` made to fail so that a bad input
caught only after training starts fails the test too; a few run as real subprocesses.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import lightning
import pytest
import torch
from omegaconf import open_dict

from conftest import compose_cfg
from prunelab.finetune import training_key
from prunelab.train import execute

SMOKE = ["+experiment=smoke"]


# --- inputs on disk, made under tmp/in before the run (paths in overrides: {in}) ---------------------------


def empty(tmp: Path, cfg) -> None:
    (tmp / "empty.pt").write_bytes(b"")


def garbage(tmp: Path, cfg) -> None:
    (tmp / "garbage.pt").write_bytes(b"these are not the weights you are looking for")


def pickled_module(tmp: Path, cfg) -> None:
    torch.save(torch.nn.Linear(2, 2), tmp / "module.pt")  # weights_only refuses it


def run_folder(tmp: Path, cfg) -> None:
    (tmp / "run" / "models").mkdir(parents=True)
    (tmp / "run" / "models" / "dense.pt").write_bytes(b"x")


def dangling(tmp: Path, cfg) -> None:
    os.symlink(tmp / "gone.pt", tmp / "dangling.pt")


def wrong_arch(tmp: Path, cfg) -> None:
    # a state_dict of another network: two shapes off, keys missing, one key unknown
    torch.save({"features.0.weight": torch.zeros(8, 3, 3, 3), "classifier.6.weight": torch.zeros(100, 4096),
                "head.fc.weight": torch.zeros(2, 2)}, tmp / "wrong.pt")


def lightning_ckpt(tmp: Path, cfg) -> None:
    torch.save({"state_dict": {"net.w": torch.zeros(1)}, "epoch": 0, "pytorch-lightning_version": "2.6"},
               tmp / "last.ckpt")


def not_a_checkpoint(tmp: Path, cfg) -> None:
    torch.save({"a": 1}, tmp / "dict.ckpt")  # loads, but holds no Lightning checkpoint


def ckpt_and_weights(tmp: Path, cfg) -> None:
    lightning_ckpt(tmp, cfg)
    garbage(tmp, cfg)


def corrupt_cache(tmp: Path, cfg) -> None:
    entry = Path(cfg.finetune.cache_dir) / training_key(cfg)
    entry.mkdir(parents=True)
    (entry / "dense.pt").write_bytes(b"PK\x03\x04 half a zip")


def a_file(tmp: Path, cfg) -> None:
    (tmp / "afile").write_text("not a folder")


def output_under_a_file(tmp: Path, cfg) -> None:
    a_file(tmp, cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp / "afile" / "run")


def output_is_a_file(tmp: Path, cfg) -> None:
    a_file(tmp, cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp / "afile")


def offline(tmp: Path, cfg) -> None:
    (tmp / "nodata").mkdir()


def no_tensorboard(tmp: Path, cfg, monkeypatch) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",  # a bare install, whatever this machine has
                        lambda name, *a: None if name in ("tensorboard", "tensorboardX") else find_spec(name, *a))


# (overrides, what the one line must contain (the key first), input maker or None)
CASES: list[tuple[list[str], tuple[str, ...], Callable | None]] = [
    # numbers that are not numbers, and out-of-range values
    (["prune.ratio=abc"], ("prune.ratio=abc", "number in [0, 1)"), None),
    (["prune.ratio=1.0"], ("prune.ratio", "[0, 1)"), None),
    (["prune.steps=abc"], ("prune.steps",), None),
    (["prune.steps=0"], ("prune.steps",), None),
    (["prune.recover_epochs=-1"], ("prune.recover_epochs",), None),
    (["prune.recover_epochs=1.5"], ("prune.recover_epochs=1.5", "fraction of one in (0, 1)"), None),
    (["prune.recover_epochs=[1,1.5]"], ("prune.recover_epochs=[1,1.5]", "one per pruning step",
                                        "prune.recover_epochs=[1,4]"), None),
    (["prune.recover_epochs=[]"], ("prune.recover_epochs=[]", "non-empty list"), None),
    (["prune.schedule=iterative", "prune.ratio=0.5", "prune.steps=2", "prune.recover_epochs=[1,2,3]"],
     ("prune.recover_epochs lists 3", "prune.steps=2", "at most 2"), None),
    (["prune.schedule=iterative", "search.grid=[0.2,0.4]", "prune.recover_epochs=[1,2,3]"],
     ("prune.recover_epochs lists 3", "search.grid", "at most 2"), None),
    (["prune.recover_schedule=linear"], ("prune.recover_schedule=linear", "constant, cosine"), None),
    (["prune.round_to=2.5"], ("prune.round_to",), None),
    (["prune.min_channels=0"], ("prune.min_channels",), None),
    (["prune.linears=maybe"], ("prune.linears=maybe", "true, false or a number > 0"), None),
    (["prune.linears=0"], ("prune.linears=0", "true, false or a number > 0"), None),
    (["prune.recover_lr=0"], ("prune.recover_lr",), None),
    (["search.grid=abc"], ("search.grid=abc", "list of numbers", "search.grid=[0.2,0.5]"), None),
    (["search.grid=[]"], ("search.grid",), None),
    (["search.grid=[0.2,1.5]"], ("search.grid",), None),
    (["search.grid=0.5"], ("search.grid", "list"), None),
    (["search.refine_step=abc"], ("search.refine_step",), None),
    (["search.refine_step=0"], ("search.refine_step",), None),
    (["search.tolerance=abc"], ("search.tolerance",), None),
    (["search.tolerance=-1"], ("search.tolerance",), None),
    (["search.final_round=-1"], ("search.final_round",), None),
    (["latency.iters=abc"], ("latency.iters",), None),
    (["latency.iters=0"], ("latency.iters",), None),
    (["latency.agreement_images=-5"], ("latency.agreement_images",), None),
    (["trainer.check_val_every_n_epoch=0"], ("trainer.check_val_every_n_epoch",), None),
    (["callbacks.model_checkpoint.min_interval_s=-5"], ("callbacks.model_checkpoint.min_interval_s",), None),
    (["prune.schedule=iterative", "trainer.devices=2"], ("prune.schedule=iterative", "trainer.devices=1"), None),
    (["search.objective=latency", "trainer.devices=2"], ("search.objective=latency", "trainer.devices=1"), None),
    (["latency.warmup=-1"], ("latency.warmup",), None),
    (["latency.batch_size=0"], ("latency.batch_size",), None),
    (["seed=abc"], ("seed=abc",), None),
    (["seed=-1"], ("seed",), None),
    (["trainer.max_epochs=-1"], ("trainer.max_epochs", ">= 1"), None),
    (["trainer.max_epochs=1.5"], ("trainer.max_epochs", "integer"), None),
    (["~trainer.max_epochs"], ("trainer.max_epochs", "missing"), None),
    (["trainer.devices=0"], ("trainer.devices",), None),
    (["trainer.limit_train_batches=1.5"], ("trainer.limit_train_batches",), None),
    (["trainer.limit_val_batches=abc"], ("trainer.limit_val_batches",), None),
    (["data.batch_size=0"], ("data.batch_size",), None),
    (["data.batch_size=abc"], ("data.batch_size",), None),
    (["data.num_workers=-1"], ("data.num_workers",), None),
    (["data.val_fraction=1.0"], ("data.val_fraction",), None),
    (["data.train_size=1"], ("data.train_size",), None),
    (["model.lr=0"], ("model.lr",), None),
    (["model.lr=abc"], ("model.lr",), None),
    (["model.momentum=1.0"], ("model.momentum",), None),
    (["model.weight_decay=-0.1"], ("model.weight_decay",), None),
    (["model.num_classes=1"], ("model.num_classes",), None),
    (["seed=${nowhere}"], ("seed",), None),
    # enums and booleans: a string like "yes" is not a boolean
    (["prune.method=random"], ("prune.method",), None),
    (["prune.scope=diagonal"], ("prune.scope",), None),
    (["prune.importance=l3"], ("prune.importance",), None),
    (["search.rule=best"], ("search.rule",), None),
    (["search.exact=yes"], ("search.exact", "true or false"), None),
    (["search.fast_eval=1"], ("search.fast_eval",), None),
    (["latency.include_transfer=yes"], ("latency.include_transfer",), None),
    (["stages.prune=yes"], ("stages.prune",), None),
    (["model.channels_last=yes"], ("model.channels_last", "auto"), None),
    (["model.compile=maybe"], ("model.compile",), None),
    (["model.compile_mode=fastest"], ("model.compile_mode", "reduce-overhead"), None),
    (["model.fused_optimizer=yes"], ("model.fused_optimizer",), None),
    (["model.arch=notanet"], ("model.arch",), None),
    (["model.weights=BOGUS"], ("model.weights",), None),
    (["trainer.accelerator=tpu"], ("trainer.accelerator",), None),
    (["+trainer.strategy=bogus"], ("trainer.strategy",), None),
    (["trainer.precision=foo"], ("trainer.precision",), None),
    pytest.param(["trainer.accelerator=gpu"], ("trainer.accelerator=gpu", "GPU"), None,
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
    # keys other config groups may add: checked when present
    (["++latency.runtime=jit"], ("latency.runtime",), None),
    (["++latency.dtype=int8"], ("latency.dtype",), None),
    (["++latency.batch_sizes=[0,8]"], ("latency.batch_sizes",), None),
    (["++latency.compile=yes"], ("latency.compile",), None),
    (["++latency.fuse=yes"], ("latency.fuse",), None),
    (["trainer.accelerator=cpu", "latency.fuse=true"], ("latency.fuse=true", "CUDA"), None),
    (["++search.objective=speed"], ("search.objective",), None),
    (["++search.methods=[channel+bogus]"], ("search.methods",), None),
    (["++search.confidence=1.5"], ("search.confidence",), None),
    (["+search.tolerence=2"], ("search.tolerence", "did you mean search.tolerance?"), None),
    (["+prune.ratoi=0.5"], ("prune.ratoi", "did you mean prune.ratio?"), None),
    (["search.methods=[channel,channel]"], ("search.methods", "channel more than once",
                                             "search.methods=[channel]"), None),
    # files the run reads
    (["finetune.weights_path={in}/empty.pt"], ("finetune.weights_path", "empty"), empty),
    (["finetune.weights_path={in}/garbage.pt"], ("finetune.weights_path", "not a PyTorch weights file"), garbage),
    (["finetune.weights_path={in}/module.pt"], ("finetune.weights_path", "refuses"), pickled_module),
    (["finetune.weights_path={in}/run"], ("finetune.weights_path", "is a directory", "models/dense.pt"), run_folder),
    (["finetune.weights_path={in}/nothing.pt"], ("finetune.weights_path", "does not exist"), None),
    (["finetune.weights_path={in}/dangling.pt"], ("finetune.weights_path", "gone.pt"), dangling),
    (["finetune.weights_path={in}/wrong.pt"],
     ("finetune.weights_path", "missing keys", "1 unexpected key (head.fc.weight)", "2 shape mismatches",
      "classifier.6.weight (100, 4096) vs (10, 4096)"), wrong_arch),
    (["finetune.weights_path={in}/last.ckpt"], ("finetune.weights_path", "ckpt_path"), lightning_ckpt),
    (["ckpt_path={in}/nothing.ckpt"], ("ckpt_path", "does not exist"), None),
    (["ckpt_path={in}/dangling.pt"], ("ckpt_path", "gone.pt"), dangling),
    (["ckpt_path={in}"], ("ckpt_path", "directory"), None),
    (["ckpt_path={in}/empty.pt"], ("ckpt_path", "empty"), empty),
    (["ckpt_path={in}/garbage.pt"], ("ckpt_path",), garbage),
    (["ckpt_path={in}/dict.ckpt"], ("ckpt_path", "dict.ckpt"), not_a_checkpoint),
    (["ckpt_path={in}/last.ckpt", "finetune.weights_path={in}/garbage.pt"], ("ckpt_path", "finetune.weights_path"),
     ckpt_and_weights),
    ([], ("cached fine-tune", "dense.pt", "finetune.cache=false"), corrupt_cache),
    # folders the run writes
    ([], ("paths.output_dir", "Not a directory"), output_under_a_file),
    ([], ("paths.output_dir", "is a file"), output_is_a_file),
    (["paths.cache_dir={in}/afile/cache"], ("finetune.cache_dir",), a_file),
    # offline: every missing prerequisite in one message
    (["data=cifar10", "data.download=false", "data.root={in}/nodata", "model.weights=IMAGENET1K_V1"],
     ("data.download=false", "data_batch_1", "model.weights=IMAGENET1K_V1", "vgg16-397923af.pth"), offline),
    # extras a setting needs
    (["logger=tensorboard"], ("logger=tensorboard", "pip install prunelab[tensorboard]"), no_tensorboard),
]


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def _case_id(case) -> str:
    overrides, must, _ = case.values if hasattr(case, "values") else case
    return " ".join(overrides) or must[0]


@pytest.mark.parametrize("overrides, must, make", CASES, ids=[_case_id(c) for c in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, monkeypatch, overrides, must, make):
    inputs = tmp_path / "in"
    inputs.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty hub cache, whatever this machine has

    def no_training(*args, **kwargs):
        raise AssertionError("training started: the bad input was not caught before any work")

    monkeypatch.setattr(lightning.Trainer, "fit", no_training)
    cfg = compose_cfg(tmp_path, SMOKE + [o.replace("{in}", str(inputs)) for o in overrides])
    if make is not None:  # a maker that takes monkeypatch changes what this machine has, for this case only
        make(inputs, cfg, *([monkeypatch] if make.__code__.co_argcount == 3 else []))
    before = _files(tmp_path)
    capsys.readouterr()

    status = execute(cfg)

    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == 2, err
    assert len(lines) == 1 and lines[0].startswith("prunelab: error: "), err
    for text in must:
        assert text in lines[0], (text, lines[0])
    assert "Traceback" not in err and "weights_only" not in err
    assert _files(tmp_path) == before  # no result, checkpoint, cache entry or probe file left behind
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


def test_table_is_large_enough():
    assert len(CASES) >= 40


# --- the real command, in subprocesses (each costs seconds: a few only) ----------------------------------


def _one_error_line(r) -> str:
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "weights_only" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("prunelab: error: ")]
    assert len(errors) == 1, r.stderr
    return errors[0]


def _nothing_written(logs: Path) -> None:
    # Hydra writes its .hydra/ and train.log into the run folder before the job starts; prunelab must not
    assert not [p for p in logs.rglob("*") if p.name in ("report.json", "report.md", "models", "checkpoints")]


def test_cli_empty_weights_file(run_cli, tmp_path):
    (tmp_path / "dense.pt").write_bytes(b"")
    line = _one_error_line(run_cli(*SMOKE, f"finetune.weights_path={tmp_path / 'dense.pt'}"))
    assert "finetune.weights_path" in line and "empty" in line
    _nothing_written(tmp_path / "logs")


def test_cli_grid_not_a_list(run_cli, tmp_path):
    line = _one_error_line(run_cli(*SMOKE, "search.grid=abc"))
    assert "search.grid=abc" in line and "search.grid=[0.2,0.5]" in line
    _nothing_written(tmp_path / "logs")


def test_cli_dangling_ckpt_link(run_cli, tmp_path):
    os.symlink(tmp_path / "gone.ckpt", tmp_path / "last.ckpt")
    line = _one_error_line(run_cli(*SMOKE, f"ckpt_path={tmp_path / 'last.ckpt'}"))
    assert "ckpt_path" in line and "gone.ckpt" in line
    _nothing_written(tmp_path / "logs")


def test_cli_unwritable_log_dir(run_cli, tmp_path):
    # Hydra itself makes the run folder: under a file it used to end in Hydra's traceback and exit 1
    (tmp_path / "afile").write_text("not a folder")
    line = _one_error_line(run_cli(*SMOKE, f"paths.log_dir={tmp_path / 'afile' / 'logs'}"))
    assert "hydra.run.dir" in line and "paths.log_dir" in line


@pytest.mark.skipif(any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")),
                    reason="tensorboard is installed here")
def test_cli_tensorboard_without_the_extra(run_cli, tmp_path):
    line = _one_error_line(run_cli(*SMOKE, "logger=tensorboard"))
    assert "logger=tensorboard" in line and "pip install prunelab[tensorboard]" in line
    _nothing_written(tmp_path / "logs")


def test_cli_offline_reports_data_and_weights_together(run_cli, tmp_path):
    r = run_cli("data.download=false", f"data.root={tmp_path / 'nodata'}", "model.weights=IMAGENET1K_V1",
                env={"TORCH_HOME": str(tmp_path / "torch_home")})
    line = _one_error_line(r)
    assert "data.download=false" in line and "model.weights=IMAGENET1K_V1" in line
    _nothing_written(tmp_path / "logs")


# --- found only once the dense model is known: after the fine-tune, before the search ----------------------


def test_a_weak_dense_model_or_a_split_too_small_to_resolve_the_tolerance_is_not_searched():
    from prunelab.prune_stage import searchable_problem

    chance = searchable_problem((21, 192), 10, 1.0)  # 10.9% on 10 classes: one epoch from random init
    assert "not surely 5 points above chance (10.00% for 10 classes)" in chance
    assert "trainer.max_epochs" in chance and "search.allow_weak_model=true" in chance
    tiny = searchable_problem((1, 1), 10, 1.0)  # data.train_size=5: one validation image
    assert "1 image: one image is worth 100.00 points" in tiny and "search.tolerance=1" in tiny
    assert "data.train_size" in tiny and "search.allow_weak_model=true" in tiny
    assert searchable_problem((120, 192), 10, 1.0) is None  # 62.5%, and one image is 0.52 points
    assert searchable_problem((40, 192), 2, 1.0) is not None  # 20.8% on 2 classes is below chance


def test_a_chance_level_search_stops_with_one_line_and_allow_weak_model_goes_on(tmp_path, capsys):
    fast = SMOKE + ["model=resnet18", "trainer.limit_train_batches=1", "stages.latency=false",
                    "search.grid=[0.5]", "search.refine_step=null"]
    cfg = compose_cfg(tmp_path, fast + ["search.allow_weak_model=false"])
    capsys.readouterr()
    assert execute(cfg) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "above chance" in lines[0] and "search.allow_weak_model=true" in lines[0]
    assert not (Path(cfg.paths.output_dir) / "report.json").exists()
    # the smoke experiment searches anyway (it exercises the pipeline), and its report says so
    cfg = compose_cfg(tmp_path, fast)
    assert execute(cfg) == 0
    notes = __import__("json").loads((Path(cfg.paths.output_dir) / "report.json").read_text())["notes"]
    assert any(n.startswith("search.allow_weak_model=true searched although the dense model") for n in notes)


def test_cli_refused_run_leaves_no_run_folder_and_no_hydra_warning(tmp_path):
    """From a fresh folder, no paths given: the run folder Hydra made is gone with the refusal, and
    the folders resolve outside a Hydra job (no RunDirCheck warning about HydraConfig)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "prunelab.train", *SMOKE, "search.grid=abc"], capture_output=True,
                       text=True, timeout=300, cwd=tmp_path, env=dict(os.environ, HYDRA_FULL_ERROR="0"))
    _one_error_line(r)
    assert "HydraConfig was not set" not in r.stderr and "RunDirCheck" not in r.stderr
    assert list(tmp_path.iterdir()) == []  # not even logs/smoke/runs/<time>/.hydra


def test_run_folders_of_two_processes_started_in_one_second_differ(tmp_path):
    import subprocess
    import sys

    code = ("import prunelab.config_resolvers as r; from omegaconf import OmegaConf; r.register();"
            "print(OmegaConf.create({'d': 'x_${prunelab.run_id:}'}).d)")
    ids = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
           for _ in range(2)}
    assert len(ids) == 2


def test_sigint_is_one_line_saying_what_was_kept_and_how_to_resume(tmp_path, capsys, monkeypatch):
    import prunelab.pipeline

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(prunelab.pipeline, "run", interrupted)
    cfg = compose_cfg(tmp_path, SMOKE)
    capsys.readouterr()
    assert execute(cfg) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prunelab: interrupted: kept")
    assert "ckpt_path=auto" in err[0] and "Traceback" not in err[0]
