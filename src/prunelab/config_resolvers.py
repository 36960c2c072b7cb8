"""OmegaConf resolvers that the config tree uses (registered on import of prunelab)."""

import os
import secrets
import sys

from omegaconf import OmegaConf

# One per process: with the second-resolution timestamp it makes each run's folder its own, even for
# two identical runs started in the same second (the process id alone can repeat across machines).
RUN_ID = f"{os.getpid()}-{secrets.token_hex(2)}"


def register() -> None:
    # A progress bar only where a person watches: on a terminal, not in CI logs or files.
    OmegaConf.register_new_resolver("prunelab.isatty", lambda: sys.stdout.isatty(), replace=True)
    OmegaConf.register_new_resolver("prunelab.round", lambda x, n=4: round(float(x), int(n)), replace=True)
    OmegaConf.register_new_resolver("prunelab.run_id", lambda: RUN_ID, replace=True)
    # The folder the command was started from. Unlike ${hydra:runtime.cwd} it resolves outside a
    # Hydra job too: in Hydra's callbacks and sweep set-up, where the run and sweep folders are made
    # (hydra.job.chdir=false, so it stays the same inside the job).
    OmegaConf.register_new_resolver("prunelab.cwd", os.getcwd, replace=True)
