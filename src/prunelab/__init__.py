"""prunelab: fine-tune, prune under an accuracy constraint, and measure what pruning really buys."""

from prunelab import config_resolvers as _resolvers

__version__ = "0.1.0"

_resolvers.register()
