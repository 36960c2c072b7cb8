"""The Hydra entry point: ``python -m prunelab.train [overrides]`` (``--help`` describes the app).

Thin on purpose: Hydra composes the config, ``execute`` runs ``pipeline.run`` and turns an input
error into one line on stderr and exit status 2 instead of a traceback. ``execute`` is what the
command does minus Hydra, so tests can run the command's error path in-process.
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

import prunelab  # noqa: F401  (registers the config resolvers)
from prunelab.errors import PrunelabError

log = logging.getLogger("prunelab")


def _one_console_handler() -> None:
    """Print each log line once.

    Importing Lightning gives its package logger ``lightning`` a console handler of its own, and that
    logger still propagates to the root logger, where Hydra's job logging has put a console and a
    file handler: every Lightning line came out twice (``INFO: ...`` on stderr and Hydra's format on
    stdout). Where the root logger prints, Lightning's own handler is dropped. Lightning is imported
    after Hydra configured logging, so this cannot be said in the job_logging config.
    """
    if not logging.getLogger().handlers:
        return
    lightning_log = logging.getLogger("lightning")
    for handler in list(lightning_log.handlers):
        if type(handler) is logging.StreamHandler:
            lightning_log.removeHandler(handler)


def _fail(message: str) -> None:
    print(f"prunelab: error: {' '.join(message.split())}", file=sys.stderr, flush=True)


class RunDirCheck(Callback):
    """Hydra creates the run (or sweep) folder before the job starts, so a folder it cannot create
    ended in Hydra's traceback and exit 1, before ``execute`` could say anything. Probed here first
    (hydra/default.yaml registers this callback): one line and exit 2 instead."""

    def _probe(self, key: str, folder: str) -> None:
        from pathlib import Path

        from prunelab.config_check import probe_writable

        try:
            probe_writable(key, Path(folder), "set paths.log_dir (or hydra.run.dir / hydra.sweep.dir) "
                                              "to a writable folder", [])
        except PrunelabError as exc:
            _fail(str(exc))
            sys.exit(2)

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._probe("hydra.run.dir", config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._probe("hydra.sweep.dir", config.hydra.sweep.dir)


def _run(cfg: DictConfig) -> tuple[int, dict | None]:
    from prunelab.config_check import check_values

    try:
        # The values first, before Lightning is imported (about 8 s here): a mistyped override is
        # answered in the time it takes to import torch.
        check_values(cfg)
        from prunelab.pipeline import run

        _one_console_handler()
        return 0, run(cfg)
    except PrunelabError as exc:
        _fail(str(exc))  # one line, whatever the message holds: "one line naming what to change"
        return 2, None
    except KeyboardInterrupt:
        _interrupted(cfg)
        return 130, None


def _interrupted(cfg: DictConfig) -> None:
    """SIGINT (Ctrl-C): one line saying what was kept and how to go on, no traceback."""
    paths = cfg.get("paths") or {}
    out, cache = paths.get("output_dir", "the run folder"), cfg.get("finetune", {}).get("cache_dir", "the cache")
    print(f"prunelab: interrupted: kept what was complete in {out} (the newest checkpoints/last.ckpt while "
          f"fine-tuning; search verdicts in the journal under {cache}/journals; result files are written whole or "
          "not at all); resume: run the same command again with ckpt_path=auto", file=sys.stderr, flush=True)


def execute(cfg: DictConfig) -> int:
    """Run the pipeline on a composed config; the exit status (2: an input error, already printed)."""
    return _run(cfg)[0]


def _remove_refused_run_folder(cfg: DictConfig) -> None:
    """A refused run leaves nothing behind: Hydra made the run folder (its ``.hydra/`` and
    ``train.log``) before prunelab could refuse; where that is all it holds, it goes, with the
    folders above it that it leaves empty, up to ``paths.log_dir``."""
    import shutil
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig

    try:
        out = Path(HydraConfig.get().runtime.output_dir)
        log_dir = Path(str(cfg.paths.log_dir)).resolve()
    except Exception:  # not a Hydra run, or no paths: nothing of ours to tidy
        return
    if not out.is_dir() or {p.name for p in out.iterdir()} - {".hydra", "train.log"}:
        return
    logging.shutdown()  # closes Hydra's handle on train.log
    shutil.rmtree(out, ignore_errors=True)
    folder = out.resolve().parent
    while folder != log_dir.parent and log_dir in (folder, *folder.parents) and folder.is_dir() \
            and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent


def _refuse_retired_overrides(argv: list[str]) -> None:
    """An override of a retired key (``latency.onnx=true``): one line saying what to use, exit 2.
    Hydra would refuse it first with its own error (the key is gone from the config)."""
    from prunelab.deploy.spec import retired_override

    for arg in argv:
        advice = retired_override(arg) if not arg.startswith("-") else None
        if advice:
            _fail(advice)
            sys.exit(2)


def main() -> float | None:
    """``python -m prunelab.train`` and ``prunelab-train``."""
    _refuse_retired_overrides(sys.argv[1:])
    return _hydra_main()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    status, report = _run(cfg)
    if status:
        _remove_refused_run_folder(cfg)
        sys.exit(status)
    # The value a Hydra sweeper would optimise: the chosen ratio's validation accuracy.
    pruned = report.get("pruned") or report.get("dense") or {}
    return pruned.get("val_acc", {}).get("value") if isinstance(pruned.get("val_acc"), dict) else None


if __name__ == "__main__":
    main()
