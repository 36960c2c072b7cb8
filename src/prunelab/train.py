"""The Hydra entry point: ``python -m prunelab.train [overrides]``.

Thin on purpose: Hydra composes the config, ``pipeline.run`` does the work, and input errors
become one message and exit status 2 instead of a traceback.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

import prunelab  # noqa: F401  (registers the config resolvers)
from prunelab.errors import PrunelabError

log = logging.getLogger("prunelab")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from prunelab.pipeline import run

    try:
        report = run(cfg)
    except PrunelabError as exc:
        print(f"prunelab: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    # The value a Hydra sweeper would optimise: the chosen ratio's validation accuracy.
    pruned = report.get("pruned") or report.get("dense") or {}
    return pruned.get("val_acc", {}).get("value") if isinstance(pruned.get("val_acc"), dict) else None


if __name__ == "__main__":
    main()
