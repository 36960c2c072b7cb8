"""Atomic writes (a killed run never leaves a truncated result file behind), safe loading, and
the bytes a state_dict takes on disk, as saved and packed for unstructured sparsity.

Every result goes to a temporary file in the destination's folder and is renamed over the
destination only once complete; ``os.replace`` is atomic on POSIX within one file system.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results should read like any other file
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return _atomic(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def save_state_dict(path: str | os.PathLike, state_dict: dict[str, torch.Tensor]) -> Path:
    """Save tensors only (no pickled code), contiguous and on the CPU."""
    clean = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    return _atomic(path, lambda p: torch.save(clean, p))


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# --- bytes on disk: as saved, and packed for unstructured sparsity ---------------------------------


class _ByteCounter(io.RawIOBase):
    """A write-only sink that only counts, so measuring a 500 MB state_dict allocates nothing."""

    def __init__(self):
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        n = memoryview(b).nbytes
        self.count += n
        return n


def file_bytes(obj) -> int:
    """Bytes ``torch.save`` writes for ``obj`` (a state_dict, or anything it can save)."""
    sink = _ByteCounter()
    torch.save(obj, sink)
    return sink.count


def pack_sparse(state_dict: dict[str, torch.Tensor]) -> dict:
    """Each floating tensor as (shape, packed nonzero bitmask, nonzero values) when that is smaller.

    A bitmask costs 1 bit per entry, so a tensor is packed once more than ~1/32 of its float32
    entries are zero; denser tensors and integer buffers are kept as they are.
    """
    dense, sparse = {}, {}
    for name, t in state_dict.items():
        t = t.detach().cpu()
        if not t.is_floating_point() or t.numel() == 0:
            dense[name] = t
            continue
        nz = t.reshape(-1) != 0
        values = t.reshape(-1)[nz]
        bits = torch.from_numpy(np.packbits(nz.numpy()))
        if bits.numel() + values.numel() * values.element_size() < t.numel() * t.element_size():
            sparse[name] = (list(t.shape), bits, values.clone())
        else:
            dense[name] = t
    return {"order": list(state_dict), "dense": dense, "sparse": sparse}


def unpack_sparse(packed: dict) -> dict[str, torch.Tensor]:
    """The state_dict that ``pack_sparse`` packed, bit for bit."""
    out = {}
    for name in packed["order"]:
        if name in packed["dense"]:
            out[name] = packed["dense"][name]
            continue
        shape, bits, values = packed["sparse"][name]
        numel = int(np.prod(shape)) if shape else 1
        nz = torch.from_numpy(np.unpackbits(bits.numpy(), count=numel).astype(bool))
        flat = torch.zeros(numel, dtype=values.dtype)
        flat[nz] = values
        out[name] = flat.reshape(shape)
    return out


def compressed_bytes(state_dict: dict[str, torch.Tensor]) -> int:
    """Bytes ``torch.save`` writes for the sparse-packed state_dict (see ``pack_sparse``)."""
    return file_bytes(pack_sparse(state_dict))
