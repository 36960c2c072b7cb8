"""User-facing errors: each carries one message that says what to change.

The Hydra entry point catches ``PrunelabError`` and prints only its message, so a user who
mistypes a value or runs offline sees one line and a non-zero exit instead of a traceback.
"""


class PrunelabError(Exception):
    """Base class for errors caused by input or environment, not by a bug."""


class ConfigError(PrunelabError):
    """A configuration value is out of range or unknown."""


class DataUnavailableError(PrunelabError):
    """The data set is neither on disk nor downloadable."""


class WeightsUnavailableError(PrunelabError):
    """Pretrained weights could not be fetched or found in the cache."""
