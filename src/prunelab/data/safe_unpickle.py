"""Read CIFAR-10's python batches without letting a batch file run code.

``pickle.load`` calls whatever callable the stream names, so a crafted ``data_batch_1`` under
``data.root`` could run a shell command. ``load_batch`` admits only the globals that CIFAR-10's
batches name (found by scanning the official-format files with ``pickletools.genops``):
``numpy.core.multiarray._reconstruct`` (the Python 2 pickles of the official archive),
``numpy._core.multiarray._reconstruct`` (numpy 2 re-packs), ``numpy.ndarray`` and
``numpy.dtype``. Everything else (dicts, lists, tuples, strings, bytes, numbers) needs no global.

Even those three are not handed to numpy as they are: numpy's own ``dtype.__setstate__`` takes
field layouts and flags from the stream, and a forged state (object fields with the
"holds objects" flag cleared) makes ``ndarray.__setstate__`` read raw pickle bytes as object
pointers, which crashes the process. So the admitted names resolve to stand-ins that accept
only plain numeric dtypes (kinds b, i, u, f) and build each array with ``np.frombuffer``; after
loading, every object in the result is checked to be one of the kinds above.
"""

from __future__ import annotations

import math
import pickle
import re
from pathlib import Path

import numpy as np

from prunelab.errors import DataUnavailableError

REPLACE_HINT = ("Replace the folder under data.root with the cifar-10-batches-py folder "
                "of the official archive.")

# A plain numeric dtype as numpy pickles it: kind letter + item size ('u1', 'i8', 'f4', 'b1').
_NUMERIC_SPEC = re.compile(r"[biuf][1-9][0-9]?")
_BYTE_ORDERS = ("|", "<", ">", "=")
_LEAVES = (str, bytes, int, float, type(None))  # bool is an int


def _show(text: object, limit: int = 60) -> str:
    """A name from the stream, fit for a one-line message (it may hold newlines or be huge)."""
    text = str(text)
    if len(text) <= limit and text.isprintable():
        return text
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


class _NdarrayClass:
    """What ``numpy.ndarray`` resolves to: only a tag for ``_reconstruct``'s first argument.

    The real class would be callable from the stream (``ndarray(shape, 'O')`` makes an
    object array), so the stand-in is deliberately not callable; no slots, so a BUILD opcode
    cannot set attributes on the shared instance.
    """

    __slots__ = ()


_NDARRAY = _NdarrayClass()


class _Dtype:
    """Stand-in for ``numpy.dtype(spec, align, copy)`` plus the state its pickle sets."""

    def __init__(self, owner: SafeUnpickler, spec, *_flags):
        if not isinstance(spec, str) or not _NUMERIC_SPEC.fullmatch(spec):
            raise owner.refuse_dtype(spec)
        try:
            self.dtype = np.dtype(spec)
        except TypeError:
            raise owner.refuse_dtype(spec) from None
        self.owner = owner

    def __setstate__(self, state) -> None:
        # (3, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata]); older
        # numpys wrote shorter tuples. Only the byte order matters for a plain numeric dtype;
        # a subarray, names or fields (any non-int, non-None entry) would make it structured.
        if not isinstance(state, tuple) or not state:
            raise self.owner.refuse_dtype(self.dtype.str)
        rest = state[1:] if isinstance(state[0], int) else state
        if not rest or rest[0] not in _BYTE_ORDERS:
            raise self.owner.refuse_dtype(self.dtype.str)
        for item in rest[1:]:
            if not (item is None or isinstance(item, int) or item == {}):
                raise self.owner.refuse_dtype(f"{self.dtype.str} with fields or a subarray")
        if rest[0] in "<>":
            self.dtype = self.dtype.newbyteorder(rest[0])


class _Array:
    """Stand-in for ``_reconstruct(ndarray, shape, typecode)``; the array arrives with its state."""

    def __init__(self, owner: SafeUnpickler, subtype, *_args):
        if subtype is not _NDARRAY:  # an ndarray subclass would be another global, so refused
            raise owner.refuse(f"an array of type {_show(subtype)}")
        self.owner = owner
        self.array: np.ndarray | None = None

    def __setstate__(self, state) -> None:
        # (1, shape, dtype, is_fortran, rawdata); numpy < 1.0 left the version out.
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]
        if not (isinstance(state, tuple) and len(state) == 4):
            raise self.owner.refuse("an array whose pickled state is not numpy's")
        shape, dtype, fortran, raw = state
        if not isinstance(dtype, _Dtype):
            raise self.owner.refuse("an array without a plain numeric dtype")
        if not (isinstance(shape, tuple) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise self.owner.refuse(f"an array of shape {_show(shape)}")
        if isinstance(raw, str):  # Python 2 pickles read with encoding="latin1"
            raw = raw.encode("latin1")
        if not isinstance(raw, bytes | bytearray):
            raise self.owner.refuse("an array whose data are objects, not bytes")
        dt = dtype.dtype
        if len(raw) != math.prod(shape) * dt.itemsize:
            raise self.owner.refuse(f"an array of shape {shape} x {dt} with {len(raw)} bytes of data")
        flat = np.frombuffer(raw, dtype=dt)
        # copy: frombuffer's array is read-only and would keep the whole pickle's bytes alive
        self.array = flat.reshape(shape, order="F" if fortran else "C").copy(order="K")


class SafeUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only the globals a CIFAR-10 python batch names."""

    def __init__(self, file, path: Path | str):
        super().__init__(file, encoding="latin1")  # the official batches are Python 2 pickles
        self.path = path

    def refuse(self, what: str) -> DataUnavailableError:
        return DataUnavailableError(
            f"{self.path} holds {what}, which a CIFAR-10 batch never contains: refusing to load it. "
            + REPLACE_HINT
        )

    def refuse_dtype(self, spec) -> DataUnavailableError:
        return self.refuse(f"a numpy array of dtype {_show(spec)}")

    def find_class(self, module: str, name: str):
        # Called for GLOBAL, STACK_GLOBAL and the extension-registry opcodes alike, before
        # anything is imported or called: nothing outside this table can run.
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return lambda subtype, *args: _Array(self, subtype, *args)
        if module == "numpy" and name == "ndarray":
            return _NDARRAY
        if module == "numpy" and name == "dtype":
            return lambda spec, *flags: _Dtype(self, spec, *flags)
        raise DataUnavailableError(
            f"{self.path} holds a pickled {_show(module)}.{_show(name)}, which a CIFAR-10 batch "
            "never contains: refusing to load it (loading would run code). " + REPLACE_HINT
        )

    def persistent_load(self, pid):
        raise self.refuse("a persistent reference")

    def resolve(self, obj, memo: dict[int, object]):
        """``obj`` with every array stand-in replaced by its ndarray; anything else is refused."""
        if isinstance(obj, _LEAVES):
            return obj
        if id(obj) in memo:  # shared or self-referencing containers (the pickle memo allows both)
            return memo[id(obj)]
        if isinstance(obj, _Array):
            if obj.array is None:
                raise self.refuse("an array without data")
            arr = obj.array
            # Guaranteed by _Dtype already; checked again on the result because it is what keeps
            # object arrays out.
            if arr.dtype.kind not in "biuf" or arr.dtype.hasobject or arr.dtype.names is not None:
                raise self.refuse_dtype(arr.dtype.str)
            memo[id(obj)] = arr
            return arr
        if isinstance(obj, list):
            out: list = []
            memo[id(obj)] = out
            out.extend(self.resolve(item, memo) for item in obj)
            return out
        if isinstance(obj, dict):
            out_d: dict = {}
            memo[id(obj)] = out_d
            for key, value in obj.items():
                if not isinstance(key, _LEAVES):
                    raise self.refuse(f"a dict keyed by {type(key).__name__}")
                out_d[key] = self.resolve(value, memo)
            return out_d
        if isinstance(obj, tuple):
            return tuple(self.resolve(item, memo) for item in obj)
        raise self.refuse(f"a {_show(type(obj).__name__)}")

    def load(self):
        return self.resolve(super().load(), {})


def load_batch(path: Path) -> object:
    """Unpickle one CIFAR batch file, refusing anything a CIFAR-10 batch cannot contain.

    Raises ``DataUnavailableError`` (one line, naming ``path``) for a refused global or dtype;
    other failures (a truncated or non-pickle file) propagate as the unpickler raised them.
    """
    with open(path, "rb") as fh:
        return SafeUnpickler(fh, path).load()
