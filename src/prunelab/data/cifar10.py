"""CIFAR-10 as a LightningDataModule: the official archive (downloaded, checksum verified) or
any local folder in the ``cifar-10-batches-py`` layout, official or not.

torchvision's CIFAR10 refuses folders whose md5 sums differ from the release (a subset, a
re-packed copy), so the pickles are read here directly; the download itself still goes through
torchvision's verified archive download.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from torchvision.datasets import CIFAR10

from prunelab.data.arrays import ArrayDataModule
from prunelab.errors import DataUnavailableError

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]


def read_batches(folder: Path, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read CIFAR python-pickle batches into (N, 32, 32, 3) uint8 images and int64 labels."""
    images, labels = [], []
    for name in names:
        path = folder / name
        try:
            with open(path, "rb") as fh:
                entry = pickle.load(fh, encoding="latin1")
            data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            ys = entry["labels"] if "labels" in entry else entry["fine_labels"]
        except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError) as exc:
            raise DataUnavailableError(
                f"{path} is not a readable CIFAR-10 batch ({type(exc).__name__}: {exc}). "
                "Replace the folder under data.root with a complete cifar-10-batches-py."
            ) from None
        images.append(data.transpose(0, 2, 3, 1))
        labels.append(np.asarray(ys, dtype=np.int64))
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


class CIFAR10DataModule(ArrayDataModule):
    """CIFAR-10: the 50k training set split train/val (40,000/10,000 by default), the 10k test set."""

    def __init__(self, root: str = "data", download: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.root = Path(root).expanduser()
        self.download = download

    @property
    def folder(self) -> Path:
        return self.root / FOLDER

    def is_present(self) -> bool:
        return all((self.folder / f).is_file() for f in TRAIN_FILES + TEST_FILES)

    def prepare_data(self) -> None:
        if self.is_present():
            return
        where = f"data.root={self.root.resolve()} (looked for {self.folder.resolve()})"
        if not self.download:
            raise DataUnavailableError(
                f"CIFAR-10 not found under {where} and data.download=false. Put an extracted "
                f"'{FOLDER}' folder under data.root, or set data.download=true on a machine with "
                "internet access."
            )
        try:
            CIFAR10(str(self.root), train=True, download=True)
        except Exception as exc:  # network errors come as URLError, HTTPError, OSError, RuntimeError
            archive = self.root / CIFAR10.filename
            if archive.exists() and archive.stat().st_size == 0:
                archive.unlink()
            raise DataUnavailableError(
                f"CIFAR-10 not found under {where} and the download failed "
                f"({type(exc).__name__}: {exc}). Either download {CIFAR10.url}, extract it into "
                f"data.root, and rerun; or point data.root at a folder that contains '{FOLDER}' "
                "and set data.download=false."
            ) from None

    def _load_arrays(self):
        if not self.is_present():
            self.prepare_data()
        x_train, y_train = read_batches(self.folder, TRAIN_FILES)
        x_test, y_test = read_batches(self.folder, TEST_FILES)
        return x_train, y_train, x_test, y_test
