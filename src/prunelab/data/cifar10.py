"""CIFAR-10 as a LightningDataModule: the official archive (downloaded, checksum verified) or
any local folder in the ``cifar-10-batches-py`` layout, official or not.

torchvision's CIFAR10 refuses folders whose md5 sums differ from the release (a subset, a
re-packed copy), so the pickles are read here directly; the download itself still goes through
torchvision's verified archive download. Since such a folder is not verified, its pickles are read
with a restricted unpickler (``prunelab.data.safe_unpickle``) that cannot run code, and each
batch must hold what a CIFAR-10 batch holds (a dict with uint8 ``data`` of N x 3072 pixels and N
``labels`` in 0..9), else loading stops with one line naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torchvision.datasets import CIFAR10

from prunelab.data.arrays import ArrayDataModule
from prunelab.data.safe_unpickle import load_batch
from prunelab.errors import DataUnavailableError

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]
IMAGE_SIZE = 3 * 32 * 32  # one image in a batch's 'data': 3 colour planes of 32 x 32, row by row
NUM_CLASSES = 10


def _bad_batch(path: Path, problem: str) -> DataUnavailableError:
    return DataUnavailableError(
        f"{path} is not a CIFAR-10 batch: {problem}. "
        f"Replace the folder under data.root with a complete {FOLDER}."
    )


def batch_arrays(path: Path, entry: object) -> tuple[np.ndarray, np.ndarray]:
    """(N, 32, 32, 3) uint8 images and N int64 labels from one unpickled batch, or one clear error.

    The folder may be anything under data.root, so the shape of what it unpickled to is checked
    here, where the file can still be named, rather than failing later in a reshape or a loader.
    """
    if not isinstance(entry, dict) or "data" not in entry or "labels" not in entry:
        if isinstance(entry, dict):
            got = f"a dict with keys {sorted(map(str, entry))[:8]}"
        else:
            got = f"a {type(entry).__name__}"
        raise _bad_batch(path, f"expected a dict with 'data' and 'labels', got {got}")
    data, ys = entry["data"], entry["labels"]
    if isinstance(data, list):  # a hand-made re-pack may hold plain lists of pixel values
        data = np.asarray(data)
    if (not isinstance(data, np.ndarray) or data.dtype.kind not in "iu"
            or data.size == 0 or data.size % IMAGE_SIZE):
        got = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise _bad_batch(path, f"expected 'data' as uint8 pixels of N images x {IMAGE_SIZE} "
                               f"(N x 3 x 32 x 32), got {got}")
    if data.dtype != np.uint8:
        if data.min() < 0 or data.max() > 255:
            raise _bad_batch(path, f"expected 'data' as pixel values in 0..255, got {data.min()}..{data.max()}")
        data = data.astype(np.uint8)
    n = data.size // IMAGE_SIZE
    labels = np.asarray(ys) if isinstance(ys, list | np.ndarray) else None
    if labels is None or labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        got = f"{labels.dtype} array of shape {labels.shape}" if labels is not None else type(ys).__name__
        raise _bad_batch(path, f"expected 'labels' as a list of {n} integers (one per image), got {got}")
    if len(labels) != n:
        raise _bad_batch(path, f"expected {n} 'labels' (one per image in 'data'), got {len(labels)}")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise _bad_batch(path, f"expected 'labels' in 0..{NUM_CLASSES - 1}, "
                               f"got {labels.min()}..{labels.max()}")
    images = data.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels.astype(np.int64)


def read_batches(folder: Path, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read CIFAR python-pickle batches into (N, 32, 32, 3) uint8 images and int64 labels."""
    images, labels = [], []
    for name in names:
        path = folder / name
        try:
            entry = load_batch(path)
        except DataUnavailableError:
            raise  # a refused global or dtype: already one line naming the file
        except Exception as exc:  # unpickling foreign bytes can raise nearly anything
            detail = " ".join(str(exc).split())[:200]
            raise DataUnavailableError(
                f"{path} is not a readable CIFAR-10 batch ({type(exc).__name__}: {detail}). "
                f"Replace the folder under data.root with a complete {FOLDER}."
            ) from None
        x, y = batch_arrays(path, entry)
        images.append(x)
        labels.append(y)
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
