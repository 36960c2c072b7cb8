"""A data folder under data.root cannot run code, and a malformed batch is one clear error line."""

import os
import pathlib
import pickle
import pickletools

import numpy as np
import pytest

from conftest import SUBSET
from prunelab.data import CIFAR10DataModule
from prunelab.data.cifar10 import FOLDER, TEST_FILES, TRAIN_FILES, read_batches
from prunelab.data.safe_unpickle import load_batch
from prunelab.errors import DataUnavailableError


def _batch(n: int = 4, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"batch_label": "test", "labels": [int(v) for v in rng.integers(0, 10, n)],
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "filenames": [f"{i}.png" for i in range(n)]}


def _folder(root: pathlib.Path, first: bytes) -> pathlib.Path:
    """A cifar-10-batches-py folder whose data_batch_1 is ``first`` and whose other batches are fine."""
    folder = root / FOLDER
    folder.mkdir(parents=True)
    for i, name in enumerate(TRAIN_FILES + TEST_FILES):
        (folder / name).write_bytes(first if i == 0 else pickle.dumps(_batch(seed=i)))
    return folder


def _load(root: pathlib.Path) -> CIFAR10DataModule:
    dm = CIFAR10DataModule(root=str(root), download=False, num_workers=0)
    dm.setup()
    return dm


class _Call:
    """Pickles as ``func(*args)``: what a crafted batch would ask the unpickler to run."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("how", ["path_touch", "os_system", "inside_the_dict"])
def test_crafted_batch_cannot_run_code(tmp_path, how):
    marker = tmp_path / "marker"
    if how == "path_touch":
        payload = _Call(pathlib.Path.touch, str(marker))
    elif how == "os_system":
        payload = _Call(os.system, f"touch {marker}")
    else:
        payload = {**_batch(), "extra": _Call(pathlib.Path.touch, str(marker))}
    folder = _folder(tmp_path / "root", pickle.dumps(payload))
    with pytest.raises(DataUnavailableError) as exc:
        _load(tmp_path / "root")
    msg = str(exc.value)
    assert str(folder / "data_batch_1") in msg and "refusing to load" in msg and "data.root" in msg
    assert "posix.system" in msg or "os.system" in msg or "Path.touch" in msg
    assert "\n" not in msg
    assert not marker.exists()


def test_object_arrays_are_refused(tmp_path):
    batch = {**_batch(), "data": np.array([b"x"] * (4 * 3072), dtype=object)}
    folder = _folder(tmp_path, pickle.dumps(batch))
    with pytest.raises(DataUnavailableError, match="dtype") as exc:
        _load(tmp_path)
    assert str(folder / "data_batch_1") in str(exc.value)


def test_object_array_built_from_the_admitted_ndarray_name_is_refused(tmp_path):
    # numpy.ndarray is admitted (as _reconstruct's argument); calling it must not make an array
    batch = {**_batch(), "data": _Call(np.ndarray, (4 * 3072,), "O")}
    _folder(tmp_path, pickle.dumps(batch))
    with pytest.raises(DataUnavailableError, match="data_batch_1"):
        _load(tmp_path)


_reconstruct = np.zeros(1).__reduce__()[0]  # numpy.core or numpy._core, as this numpy spells it


class _ForgedDtype:
    """A dtype whose pickled state adds a field. numpy's own unpickling accepts such states: a
    'V8' with an object field and the "holds objects" flag cleared loads as an array whose raw
    pickle bytes are read as object pointers (printing it crashes the interpreter)."""

    def __init__(self, base: str, field: str):
        self.base, self.field = base, field

    def __reduce__(self):
        fields = {"a": (np.dtype(self.field), 0)}
        return np.dtype, (self.base, False, True), (3, "|", None, ("a",), fields, 8, 1, 0)


class _RawArray:
    def __init__(self, dtype, raw: bytes):
        self.dtype, self.raw = dtype, raw

    def __reduce__(self):
        return _reconstruct, (np.ndarray, (0,), b"b"), (1, (1,), self.dtype, False, self.raw)


@pytest.mark.parametrize(("base", "field"), [("V8", "O"), ("u1", "u1")])
def test_forged_dtype_state_is_refused(tmp_path, base, field):
    batch = {**_batch(), "extra": _RawArray(_ForgedDtype(base, field), b"A" * 8)}
    _folder(tmp_path, pickle.dumps(batch))
    with pytest.raises(DataUnavailableError, match="holds a numpy array of dtype"):
        _load(tmp_path)


def _python2_style(batch: dict) -> bytes:
    """``batch`` pickled as the official (Python 2, numpy 1.x) archive was: protocol 2, the
    ``numpy.core.multiarray`` spelling, pixel data as a byte string (read back as latin-1 str)."""
    class Py2Array:
        def __init__(self, a):
            self.a = a

        def __reduce__(self):
            state = (1, self.a.shape, self.a.dtype, False, self.a.tobytes().decode("latin1"))
            return _reconstruct, (np.ndarray, (0,), "b"), state

    blob = pickle.dumps({**batch, "data": Py2Array(batch["data"])}, protocol=2)
    blob = blob.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")  # numpy 2 -> 1
    globals_ = {arg for op, arg, _ in pickletools.genops(blob) if op.name == "GLOBAL"}
    assert globals_ == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
    return blob


def test_official_archive_pickle_format_loads(tmp_path):
    batch = _batch(n=6)
    path = tmp_path / "data_batch_1"
    path.write_bytes(_python2_style(batch))
    entry = load_batch(path)
    assert np.array_equal(entry["data"], batch["data"]) and entry["data"].dtype == np.uint8
    assert entry["labels"] == batch["labels"] and entry["filenames"] == batch["filenames"]


def test_numeric_arrays_of_every_layout_round_trip(tmp_path):
    arrays = {"f": np.asfortranarray(np.arange(12, dtype=">f4").reshape(3, 4)),
              "b": np.array([True, False]), "i": np.arange(-3, 3, dtype=np.int16), "e": np.zeros((0, 5))}
    path = tmp_path / "x"
    path.write_bytes(pickle.dumps(arrays))
    loaded = load_batch(path)
    for key, a in arrays.items():
        assert np.array_equal(loaded[key], a) and loaded[key].shape == a.shape
        assert loaded[key].dtype.kind == a.dtype.kind and loaded[key].dtype.itemsize == a.dtype.itemsize
        assert loaded[key].flags.writeable


@pytest.mark.skipif(not SUBSET.exists(), reason="shared CIFAR-10 subset not present")
def test_real_subset_still_loads():
    folder = SUBSET / FOLDER
    x_train, y_train = read_batches(folder, TRAIN_FILES)
    x_test, y_test = read_batches(folder, TEST_FILES)
    assert x_train.shape == (4068, 32, 32, 3) and y_train.shape == (4068,)
    assert x_test.shape == (1017, 32, 32, 3) and y_test.shape == (1017,)
    assert x_train.dtype == np.uint8 and y_train.dtype == np.int64
    reference = pickle.load(open(folder / "test_batch", "rb"), encoding="latin1")  # trusted here
    assert np.array_equal(x_test, reference["data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    assert np.array_equal(y_test, reference["labels"])


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ([1, 2, 3], "expected a dict with 'data' and 'labels', got a list"),
        ({"data": np.zeros((1, 3072), np.uint8)}, "expected a dict with 'data' and 'labels'"),
        ({"labels": [1], "data": np.zeros(3000, np.uint8)}, "N images x 3072"),
        ({"labels": [1], "data": "pixels"}, "N images x 3072"),
        ({"labels": [1, 2], "data": np.zeros((1, 3072), np.uint8)}, "expected 1 'labels'"),
        ({"labels": "1", "data": np.zeros((1, 3072), np.uint8)}, "expected 'labels' as a list of 1 integers"),
        ({"labels": [10], "data": np.zeros((1, 3072), np.uint8)}, r"expected 'labels' in 0\.\.9"),
        ({"labels": [1], "data": np.full((1, 3072), 300)}, r"pixel values in 0\.\.255"),
    ],
    ids=["list", "no-labels", "wrong-length", "not-an-array", "label-count", "labels-str", "label-range", "pixels"],
)
def test_wrong_batch_content_is_one_clear_line(tmp_path, entry, expected):
    folder = _folder(tmp_path, pickle.dumps(entry))
    with pytest.raises(DataUnavailableError, match=expected) as exc:
        _load(tmp_path)
    msg = str(exc.value)
    assert msg.startswith(f"{folder / 'data_batch_1'} is not a CIFAR-10 batch") and "\n" not in msg
