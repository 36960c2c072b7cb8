"""OmegaConf resolvers that the config tree uses (registered on import of prunelab)."""

import sys

from omegaconf import OmegaConf


def register() -> None:
    # A progress bar only where a person watches: on a terminal, not in CI logs or files.
    OmegaConf.register_new_resolver("prunelab.isatty", lambda: sys.stdout.isatty(), replace=True)
    OmegaConf.register_new_resolver("prunelab.round", lambda x, n=4: round(float(x), int(n)), replace=True)
