"""Data modules: CIFAR-10 from disk or download, class-folder image sets, and generated CIFAR-shaped data."""

from __future__ import annotations

from prunelab.data.cifar10 import CIFAR10DataModule
from prunelab.data.imagefolder import ImageFolderDataModule
from prunelab.data.synthetic import SyntheticDataModule

IMAGEFOLDER_TARGET = "prunelab.data.ImageFolderDataModule"

__all__ = ["CIFAR10DataModule", "ImageFolderDataModule", "SyntheticDataModule", "data_identity"]


def data_identity(data) -> str | None:
    """A key of the data's contents where the config alone does not fix them (class folders: a digest
    of the decoded images, labels and class names, decoding the tree first if it is not cached);
    None where it does (CIFAR-10's release, generated data)."""
    if data.get("_target_") == IMAGEFOLDER_TARGET and data.get("root"):
        from prunelab.data.imagefolder import identity

        return identity(data.root, int(data.get("image_size", 32)), data.get("cache_dir"),
                        data.get("decode_workers"))
    return None
