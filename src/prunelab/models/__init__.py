"""Models: torchvision classifiers with a new head, wrapped as a LightningModule.

Loaded on first use, so the pure rules in ``models.rewrite`` (what the config check asks) import
without Lightning."""

from __future__ import annotations

import importlib

_HOME = {"ImageClassifier": "prunelab.models.classifier", "build_classifier": "prunelab.models.factory"}

__all__ = list(_HOME)


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'prunelab.models' has no attribute {name!r}")
