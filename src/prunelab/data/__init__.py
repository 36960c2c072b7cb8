"""Data modules: CIFAR-10 from disk or download, and generated CIFAR-shaped data."""

from prunelab.data.cifar10 import CIFAR10DataModule
from prunelab.data.synthetic import SyntheticDataModule

__all__ = ["CIFAR10DataModule", "SyntheticDataModule"]
