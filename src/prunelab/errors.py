"""User-facing errors: each carries one message that says what to change.

The Hydra entry point catches ``PrunelabError`` and prints only its message, so a user who
mistypes a value or runs offline sees one line and a non-zero exit instead of a traceback.
"""

from __future__ import annotations

import os


class PrunelabError(Exception):
    """Base class for errors caused by input or environment, not by a bug."""


class ConfigError(PrunelabError):
    """A configuration value is out of range or unknown."""


class DataUnavailableError(PrunelabError):
    """The data set is neither on disk nor downloadable."""


class WeightsUnavailableError(PrunelabError):
    """Pretrained weights could not be fetched or found in the cache."""


class WeightsFileError(PrunelabError):
    """A weights file is missing, unreadable, not a state_dict, or not one of the expected model.

    ``problem`` reads after the path ("is empty (0 bytes)"), so each caller can put the config key
    and its own advice around it; ``mismatch`` tells a readable file of the wrong model apart.
    """

    def __init__(self, path: str | os.PathLike, problem: str, mismatch: bool = False):
        self.path, self.problem, self.mismatch = str(path), problem, mismatch
        super().__init__(f"{path} {problem}")
