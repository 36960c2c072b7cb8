"""Class-folder image data sets (the layout torchvision's ``ImageFolder`` reads) as a data module.

``root`` holds ``train/`` and ``test/``, and ``val/`` when the user has one; each split holds one
folder per class, named for it. Without ``val/`` the validation split is carved from ``train/`` by
the rule CIFAR-10 uses (``val_fraction``, seeded). Every image PIL can read is converted to RGB and,
where its size differs from ``image_size``, resized to ``image_size`` x ``image_size`` (bicubic,
aspect ratio not kept), so a batch is one uint8 array like CIFAR-10's.

Decoding happens once, in parallel, into uint8 arrays cached on disk (``cache_dir``) under a key
of every file's path, size and modification time and of ``image_size``: a second run loads the
arrays in about a second; a changed, added or removed file makes a new key and so a new decode.
A file that does not decode stops the run with one line naming it, and no cache entry is written.

The tree's ``identity`` (part of the fine-tune key) is a digest of what training sees, the class
names and the decoded arrays, stored with the cache entry: a tree copied to another machine or
restored with new modification times decodes once more and keeps its identity, so a training
resumes and a cached fine-tune is reused there; a changed pixel is another identity.

Within each split, files are ordered by position within their class (sorted names), classes
interleaved: image 0 of every class, then image 1 of every class, ... So ``train_size=N`` keeps a
class-balanced first N, as CIFAR-10's batches do, and the order is that of the official release
for a tree such as the shared ``cifar10-jpeg`` (``NNNN.jpg``: the image's position in its class).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from prunelab.data.arrays import ArrayDataModule
from prunelab.errors import DataUnavailableError
from prunelab.io import _atomic

SPLITS = ("train", "val", "test")
REQUIRED = ("train", "test")
# What PIL reads that a user's data set is likely to hold; other files (a README, .DS_Store) are skipped.
EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
# The cache entry's format version: bumped when the same files decode to other arrays.
_FORMAT = 1


def _class_files(split_dir: Path) -> dict[str, list[str]]:
    """{class name: sorted image file names} of one split folder (hidden folders and files skipped)."""
    classes = {}
    for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
        if entry.is_dir() and not entry.name.startswith("."):
            classes[entry.name] = sorted(
                f.name for f in os.scandir(entry.path)
                if f.is_file() and not f.name.startswith(".") and f.name.lower().endswith(EXTENSIONS))
    return classes


def _interleave(classes: dict[str, list[str]], names: list[str]) -> list[tuple[str, int]]:
    """(relative path, class index), position-major: file j of every class before file j+1 of any."""
    out = []
    longest = max((len(classes[c]) for c in names), default=0)
    for j in range(longest):
        for label, c in enumerate(names):
            if j < len(classes[c]):
                out.append((f"{c}/{classes[c][j]}", label))
    return out


def scan(root: str | os.PathLike) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """(class names, {split: [(path relative to the split, label)]}) of a class-folder tree, or one
    ``DataUnavailableError`` naming what to change (a missing split, classes that differ, an empty class)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataUnavailableError(f"data.root={root} is not a folder; point data.root at a folder holding "
                                   "train/ and test/ (and val/), one subfolder per class in each")
    absent = [s for s in REQUIRED if not (root / s).is_dir()]
    if absent:
        raise DataUnavailableError(f"data.root={root} has no {' or '.join(s + '/' for s in absent)}; a class-folder "
                                   "data set holds train/<class>/*.jpg and test/<class>/*.jpg (val/ is optional)")
    found = {s: _class_files(root / s) for s in SPLITS if (root / s).is_dir()}
    names = list(found["train"])
    if not names:
        raise DataUnavailableError(f"{root / 'train'} holds no class folders; put one folder of images per class in it")
    for split, classes in found.items():
        if list(classes) != names:
            only_here = sorted(set(classes) - set(names))
            only_train = sorted(set(names) - set(classes))
            parts = ([f"only in {split}/: {', '.join(only_here)}"] if only_here else []) + \
                    ([f"missing from {split}/: {', '.join(only_train)}"] if only_train else [])
            raise DataUnavailableError(f"the class folders of {root / split} differ from those of {root / 'train'} "
                                       f"({'; '.join(parts)}); every split must hold the same classes")
        empty = [c for c, files in classes.items() if not files]
        if empty:
            raise DataUnavailableError(f"{root / split} has class folders with no images: {', '.join(empty[:5])}; "
                                       f"add images (one of {', '.join(EXTENSIONS)}) or remove the folders")
    return names, {split: _interleave(classes, names) for split, classes in found.items()}


def files_key(root: str | os.PathLike, image_size: int) -> str:
    """The decode cache's key: every file's path, size and modification time, and the image size.
    Equal keys decode to equal arrays (a stat per file: cheap enough to check on every run)."""
    root = Path(root).expanduser()
    names, splits = scan(root)
    h = hashlib.sha256(json.dumps({"format": _FORMAT, "image_size": image_size, "classes": names}).encode())
    for split, files in splits.items():
        for rel, _ in files:
            st = os.stat(root / split / rel)
            h.update(f"{split}/{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _decode(paths: list[str], size: int) -> np.ndarray | tuple[str, str]:
    """uint8 (N, size, size, 3) of ``paths``, or (path, problem) for the first file that does not decode."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                if img.size != (size, size):
                    img = img.resize((size, size), Image.Resampling.BICUBIC)
                out[i] = np.asarray(img, dtype=np.uint8)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:  # PIL's decode errors
            return path, " ".join(str(exc).split())[:200] or type(exc).__name__
    return out


def decode_all(paths: list[str], size: int, workers: int | None = None) -> np.ndarray:
    """Decode ``paths`` in parallel (processes, in chunks); one ``DataUnavailableError`` naming the
    first file that does not decode."""
    workers = max(1, min(workers or os.cpu_count() or 1, 16))
    chunk = max(256, -(-len(paths) // (workers * 8)))
    pieces = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
    if workers == 1 or len(pieces) <= 1:
        results = [_decode(p, size) for p in pieces]
    else:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_decode, pieces, [size] * len(pieces)))
    for r in results:
        if isinstance(r, tuple):
            path, problem = r
            raise DataUnavailableError(f"{path} is not a readable image ({problem}); replace or remove it "
                                       "and rerun (nothing was cached)")
    return np.concatenate(results) if results else np.empty((0, size, size, 3), np.uint8)


def content_digest(arrays: dict[str, np.ndarray]) -> str:
    """A digest of the class names and every split's images and labels: what training sees, not
    where the files are or when they were written."""
    h = hashlib.sha256(f"format {_FORMAT}\n".encode())
    for name in sorted(k for k in arrays if k != "digest"):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}\0{a.dtype.str}\0{a.shape}\n".encode())
        h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()[:16]


def _entry(root: Path, image_size: int, cache_dir: str | os.PathLike | None) -> Path | None:
    return Path(cache_dir).expanduser() / f"{files_key(root, image_size)}.npz" if cache_dir else None


def identity(root: str | os.PathLike, image_size: int, cache_dir: str | os.PathLike | None = None,
             workers: int | None = None) -> str:
    """The tree's ``content_digest``: read from its cache entry when there is one, else the tree is
    decoded (and cached) to compute it. Part of the fine-tune key."""
    root = Path(root).expanduser()
    entry = _entry(root, image_size, cache_dir)
    if entry is not None and entry.is_file():
        try:
            with np.load(entry, allow_pickle=False) as z:
                if "digest" in z.files:
                    return str(z["digest"])
        except (OSError, ValueError, EOFError):
            pass  # damaged: load_tree decodes again and replaces it
    arrays = load_tree(root, image_size, cache_dir, workers)
    return str(arrays["digest"]) if "digest" in arrays else content_digest(arrays)


def load_tree(root: str | os.PathLike, image_size: int, cache_dir: str | os.PathLike | None,
              workers: int | None = None) -> dict[str, np.ndarray]:
    """{'classes', 'x_<split>', 'y_<split>', 'digest'} of the tree, from the cache when its key
    matches, else decoded (and cached, atomically, when ``cache_dir`` is set)."""
    root = Path(root).expanduser()
    entry = _entry(root, image_size, cache_dir)
    if entry is not None and entry.is_file():
        try:
            with np.load(entry, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError):
            pass  # a damaged entry (a disk error; writes are atomic): decode again and replace it
    names, splits = scan(root)
    arrays: dict[str, np.ndarray] = {"classes": np.array(names)}
    for split, files in splits.items():
        arrays[f"x_{split}"] = decode_all([str(root / split / rel) for rel, _ in files], image_size, workers)
        arrays[f"y_{split}"] = np.array([label for _, label in files], dtype=np.int64)
    arrays["digest"] = np.array(content_digest(arrays))
    if entry is not None:
        _atomic(entry, lambda tmp: _save_npz(tmp, arrays))
    return arrays


def _save_npz(tmp: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(tmp, "wb") as fh:  # a file object: np.savez would append ".npz" to a path
        np.savez(fh, **arrays)


class ImageFolderDataModule(ArrayDataModule):
    """Train / val / test from class folders; val from ``val/`` when present, else carved from train."""

    def __init__(self, root: str | None = None, image_size: int = 32, cache_dir: str | None = None,
                 decode_workers: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if root is None:
            raise DataUnavailableError("data=imagefolder needs data.root=PATH: a folder holding train/ and test/ "
                                       "(and val/), one subfolder of images per class in each")
        if image_size < 8:
            raise ValueError(f"data.image_size must be >= 8, got {image_size}")
        self.root = Path(root).expanduser()
        self.image_size = image_size
        self.cache_dir = cache_dir
        self.decode_workers = decode_workers
        self.classes: list[str] = []
        self._has_val = False

    def prepare_data(self) -> None:
        scan(self.root)  # a missing or inconsistent tree: one line, before any work

    def _load_arrays(self):
        arrays = load_tree(self.root, self.image_size, self.cache_dir, self.decode_workers)
        self.classes = [str(c) for c in arrays["classes"]]
        self.num_classes = len(self.classes)
        self._has_val = "x_val" in arrays
        if self._has_val:
            self._val_arrays = (arrays["x_val"], arrays["y_val"])
        return arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"]

    def _split(self, x: np.ndarray, y: np.ndarray):
        """With ``val/``: train from ``train/``, val from ``val/`` (``train_size=N`` keeps N images of
        both together, split by ``val_fraction`` as CIFAR-10's are); without it, CIFAR-10's rule."""
        if not self._has_val:
            return super()._split(x, y)
        xv, yv = self._val_arrays
        n_tr, n_val = len(x), len(xv)
        if self.train_size is not None:
            n_val = min(n_val, max(1, int(round(self.train_size * self.val_fraction))))
            n_tr = min(n_tr, self.train_size - n_val)
        pool_x = np.concatenate([x[:n_tr], xv[:n_val]])
        pool_y = np.concatenate([y[:n_tr], yv[:n_val]])
        return pool_x, pool_y, list(range(n_tr)), list(range(n_tr, n_tr + n_val))

    def describe(self) -> dict:
        return {**super().describe(), "root": str(self.root), "classes": self.classes,
                "image_size": self.image_size, "val_from": "val/" if self._has_val else "train/"}
